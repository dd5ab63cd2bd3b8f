"""A run directory is never lost or mixed up: config.yaml written atomically and only when it
changed, one trainer at a time (an OS lock a killed process releases), --resume refuses when no
checkpoint is usable, metrics.jsonl cut back to the resumed step, a diverging loss ends with one
line and the last good checkpoint kept."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fvdm
from fvdm.config import load_config
from fvdm.errors import UserError
from fvdm.train.checkpoint import verify_checkpoint
from fvdm.train.lock import RunLock
from fvdm.train.trainer import train
from helpers import TINY, cli

PKG_PARENT = str(Path(fvdm.__file__).resolve().parents[1])
SLOW_CLI = str(Path(__file__).with_name("slow_cli.py"))  # python -m fvdm with a sleep after each step


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """These tests are about the run directory: skip the loss plot and preview grids (most of a
    tiny run's time; they have their own tests)."""
    from fvdm.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "_write_plots", lambda self, path: None)
    monkeypatch.setattr(Trainer, "preview", lambda self: None)


def tiny(*extra: str):
    return load_config("demo_cpu", TINY + list(extra))


def one_line(err: str) -> str:
    """The one error line, the last thing printed (train may print what it runs on before it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_resume_does_not_rewrite_an_unchanged_config(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, progress=False)
    cfg_file = run / "config.yaml"
    before = cfg_file.stat()
    time.sleep(0.01)
    train(tiny("train.steps=3"), run, resume=True, progress=False)  # changed: rewritten
    assert load_config(cfg_file).train.steps == 3
    changed = cfg_file.stat()
    assert changed.st_mtime_ns != before.st_mtime_ns
    time.sleep(0.01)
    train(tiny("train.steps=3"), run, resume=True, progress=False)  # unchanged: left alone
    assert cfg_file.stat().st_mtime_ns == changed.st_mtime_ns


def test_full_disk_while_writing_config_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """The failure that made a run unusable: config.yaml cut to its first bytes on ENOSPC."""
    run = tmp_path / "run"
    train(tiny(), run, progress=False)
    cfg_file = run / "config.yaml"
    good = cfg_file.read_bytes()

    def full_disk(write):
        def half_then_enospc(self, data, *args, **kwargs):
            with open(self, "wb") as f:
                f.write((data.encode() if isinstance(data, str) else data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return half_then_enospc

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk(pathlib.Path.write_text))
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk(pathlib.Path.write_bytes))
    with pytest.raises(UserError, match=r"cannot write .*config\.yaml: No space left on device"):
        train(tiny("train.steps=3"), run, resume=True, progress=False)
    monkeypatch.undo()
    assert cfg_file.read_bytes() == good
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    result = train(tiny("train.steps=3"), run, resume=True, progress=False)  # the run still resumes
    assert result.step == 3


def test_resume_truncates_metrics_to_the_checkpoint_step(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=4", "train.keep_checkpoints=0"), run, progress=False)
    assert metric_steps(run) == [1, 2, 3, 4]
    # As after a kill between logging step 4 and checkpointing it.
    for f in (run / "checkpoints" / "step_000000004").iterdir():
        f.unlink()
    (run / "checkpoints" / "step_000000004").rmdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # and a line cut short
    train(tiny("train.steps=4", "train.keep_checkpoints=0"), run, resume=True, progress=False)
    assert metric_steps(run) == [1, 2, 3, 4]


def test_resume_without_a_usable_checkpoint_refuses_unless_told_to_start_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(), run, progress=False)
    ckpt = run / "checkpoints" / "step_000000002"
    (ckpt / "meta.json").unlink()
    kept = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(UserError, match=r"no usable checkpoint .*step_000000002 is incomplete: it has no "
                                        r"meta\.json.*--start-fresh"):
        train(tiny(), run, resume=True, progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == kept  # nothing replaced
    assert metric_steps(run) == [1, 2]
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress", *TINY)
    assert code == 2 and "step_000000002" in one_line(err)
    result = train(tiny(), run, resume=True, progress=False, start_fresh=True)
    assert result.step == 2 and metric_steps(run) == [1, 2]
    verify_checkpoint(ckpt)
    # a new, empty --out with --resume simply starts (make demo relies on it)
    assert train(tiny(), tmp_path / "new", resume=True, progress=False).step == 2


def test_a_second_trainer_is_refused_naming_the_holder_and_a_kill_releases_the_lock(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(), run, progress=False)
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, SLOW_CLI, "0.5", "train", "--out", str(run), "--resume", "--no-progress",
                              *TINY, "train.steps=1000", "train.ckpt_every=1000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (run / "train.lock").read_text().strip() != str(child.pid):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress", *TINY)
        line = one_line(err)
        assert code == 2 and f"process {child.pid}" in line and "in use" in line, line
        # reading a run that is training keeps working
        code, _, err = cli(capsys, "eval", "loss", "--run", str(run), "--clips", "1", "--device", "cpu")
        assert code == 0, err
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert train(tiny("train.steps=3"), run, resume=True, progress=False).step == 3


def test_lock_is_released_when_the_trainer_fails_in_process(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(UserError, match=rf"in use: process {os.getpid()} is training"):
            train(tiny(), run, progress=False)
    train(tiny(), run, progress=False)  # nothing left locked by the failed call
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(tiny(), run, progress=False)
    with RunLock(run):  # and the refused call released it too
        pass


def test_a_diverging_loss_ends_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--no-progress", *TINY, "train.steps=6", "train.ckpt_every=1",
            "train.lr=1e30", "train.keep_checkpoints=0"]
    code, _, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and "training diverged at step" in line and "train.lr" in line, line
    step = int(line.split("diverged at step ")[1].split(":")[0])
    good = run / "checkpoints" / f"step_{step - 1:09d}"
    assert str(good) in line and "kept" in line
    verify_checkpoint(good)
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())
    assert not (run / "checkpoints" / f"step_{step:09d}").exists()


def test_a_divergence_between_log_steps_names_its_step_and_where_it_was_noticed(tmp_path, capsys):
    # the loss is read to the host every train.log_every steps: the step that went bad is kept on
    # the device and reported when read, and nothing is saved from it
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--out", str(run), "--no-progress", *TINY, "train.steps=8",
                       "train.ckpt_every=8", "train.log_every=4", "train.lr=1e30")
    line = one_line(err)
    assert code == 2 and "training diverged at step 2: the loss became" in line, line
    assert "noticed at step 4" in line and "no checkpoint was saved" in line
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step_*"))
