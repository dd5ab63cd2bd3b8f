"""Checkpoints: exact round trips (dtypes, tied and strided tensors, optimizer, RNG), detection of
truncated / modified / incomplete checkpoints with fallback to the previous good one, cleanup of
killed writes, pruning, clear errors, and survival of SIGKILL at random points of a save."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fvdm
from fvdm.errors import CheckpointError, UserError
from fvdm.train.checkpoint import (
    Checkpoint,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
    verify_checkpoint,
)


def small_model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}


def save(run: Path, step: int, seed: int | None = None, **kwargs) -> Path:
    """A small checkpoint whose weights depend on `seed` (default: the step)."""
    state = small_model_state(step if seed is None else seed)
    return save_checkpoint(run, step, state, None, {"step": step}, **kwargs)


def hidden_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


# --------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_exact_dtypes_tied_and_strided_tensors(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    buffer = torch.randn(100, generator=g)
    model = {
        "fp32": base,
        "tied": base,                     # same tensor under two names (tied embeddings)
        "transposed": base.t(),           # non-contiguous view of the same storage
        "strided": buffer[::3],           # non-contiguous slice
        "slice_a": buffer[:10],           # contiguous views sharing one storage
        "slice_b": buffer[10:30].view(4, 5),
        "bf16": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(2, 2, generator=g).half(),
        "int64": torch.arange(-5, 5, dtype=torch.int64) * (1 << 40),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),  # requires_grad
    }
    ema = {k: v.detach() * 0.5 for k, v in model.items() if v.is_floating_point()}
    config = {"model": {"depth": 2}, "data": Path("/data/videos"), "lr": 1e-4}
    path = save_checkpoint(tmp_path, 42, model, ema, {"step": 42}, config=config)

    assert path == tmp_path / "checkpoints" / step_dir_name(42) == tmp_path / "checkpoints" / "step_000000042"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "meta.json", "model.safetensors", "state.pt"]
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.step == 42 and ckpt.path == path
    for name, ref in [*((f"model.{k}", v) for k, v in model.items())]:
        got = ckpt.model[name.split(".", 1)[1]]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got, ref.detach()), name
    assert ckpt.ema.keys() == ema.keys()
    assert all(torch.equal(ckpt.ema[k], v) and ckpt.ema[k].dtype == v.dtype for k, v in ema.items())
    assert ckpt.state == {"step": 42}
    # meta.json: written last, records the config and every other file's size and sha256.
    assert ckpt.config == {"model": {"depth": 2}, "data": "/data/videos", "lr": 1e-4}
    assert ckpt.meta["fvdm_version"] == fvdm.__version__ and ckpt.meta["step"] == 42
    for name, record in ckpt.meta["files"].items():
        data = (path / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_no_ema_means_no_file_and_tied_module_reloads(tmp_path: Path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied input/output embedding
    save_checkpoint(tmp_path, 1, model.state_dict(), None, {})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.ema is None and not (ckpt.path / "ema.safetensors").exists()
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(ckpt.model)
    tokens = torch.tensor([1, 2, 3])
    assert torch.equal(fresh(tokens), model(tokens))


def test_optimizer_and_scheduler_resume_exactly(tmp_path: Path):
    """Save mid-training, keep training; a fresh model/optimizer resumed from the checkpoint
    takes the same next steps bit for bit (the data of a step drawn from a generator seeded by
    the step, as the trainer does)."""
    def make():
        torch.manual_seed(123)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return net, opt, sched

    def train_step(net, opt, sched, step):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    net, opt, sched = make()
    for step in range(3):
        train_step(net, opt, sched, step)
    save_checkpoint(tmp_path, 3, net.state_dict(), None, {
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 3})
    for step in range(3, 6):
        train_step(net, opt, sched, step)
    expected = {k: v.clone() for k, v in net.state_dict().items()}

    torch.manual_seed(999)  # the resumed process starts from different global RNG state
    net2, opt2, sched2 = make()
    ckpt = load_checkpoint(tmp_path)
    net2.load_state_dict(ckpt.model)
    opt2.load_state_dict(ckpt.state["optimizer"])
    sched2.load_state_dict(ckpt.state["scheduler"])
    for step in range(ckpt.state["step"], 6):
        train_step(net2, opt2, sched2, step)
    for name, value in net2.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_round_trip(tmp_path: Path):
    w = torch.randn(4, 6, device="cuda")
    model = {"w": w, "wt": w.t(), "tied": w, "half": w.half()[:, ::2]}
    save_checkpoint(tmp_path, 1, model, None, {"m": torch.ones(2, device="cuda")})
    ckpt = load_checkpoint(tmp_path, map_location="cuda")
    assert all(ckpt.model[k].device.type == "cuda" and torch.equal(ckpt.model[k], v) for k, v in model.items())
    assert ckpt.state["m"].device.type == "cuda" and torch.equal(ckpt.state["m"].cpu(), torch.ones(2))


# --------------------------------------------------------------------------------------------
# Finding the latest, corruption, incomplete writes


def test_find_latest_picks_highest_step(tmp_path: Path):
    for step in (100, 5, 1_000_000_000, 20):  # written out of order; one step wider than 9 digits
        save(tmp_path, step, keep=None)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000000005", "step_000000020", "step_000000100", "step_1000000000"]
    assert assert_no_warnings(find_latest, tmp_path) == tmp_path / "checkpoints" / "step_1000000000"
    assert find_latest(tmp_path / "checkpoints") == find_latest(tmp_path)
    assert find_latest(tmp_path / "does-not-exist") is None
    assert load_checkpoint(tmp_path).step == 1_000_000_000


def test_truncated_model_is_named_and_previous_good_one_used(tmp_path: Path):
    save(tmp_path, 1)
    good = load_checkpoint(tmp_path).model
    bad = save(tmp_path, 2)
    model_file = bad / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])

    with pytest.raises(CheckpointError, match=r"step_000000002 is corrupt: model\.safetensors is 100 bytes .*truncated"
                                              r".*previous good checkpoint is .*step_000000001"):
        load_checkpoint(bad)
    with pytest.warns(UserWarning, match=r"step_000000002 is corrupt.*left on disk"):
        assert find_latest(tmp_path) == tmp_path / "checkpoints" / "step_000000001"
    with pytest.warns(UserWarning, match="step_000000002"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and all(torch.equal(ckpt.model[k], good[k]) for k in good)
    assert model_file.exists()  # kept for inspection


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_flipped_byte_is_detected(tmp_path: Path, name: str):
    path = save_checkpoint(tmp_path, 1, small_model_state(), small_model_state(1), {"x": torch.ones(50)})
    data = bytearray((path / name).read_bytes())
    data[-20] ^= 0x01  # inside the tensor data, so the file still parses
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step_000000001 is corrupt: {name} sha256 mismatch.*no earlier"):
        verify_checkpoint(path)
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint in .*{name} sha256 mismatch"):
        load_checkpoint(tmp_path)


def rewrite_with_matching_meta(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a file and update meta.json to match, as a buggy writer would have left it."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_corrupt_safetensors_header_is_reported(tmp_path: Path):
    path = save(tmp_path, 1)
    data = (path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    rewrite_with_matching_meta(path, "model.safetensors", data[:8] + b"{" * header_len + data[8 + header_len:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors has a bad safetensors header \(header is not valid"):
        load_checkpoint(path)
    rewrite_with_matching_meta(path, "model.safetensors", (1 << 40).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="header length 1099511627776 exceeds the file size"):
        load_checkpoint(path)


def test_corrupt_state_pt_with_matching_hash_is_reported(tmp_path: Path):
    path = save(tmp_path, 1)
    rewrite_with_matching_meta(path, "state.pt", b"not a zip archive at all")
    with pytest.raises(CheckpointError, match=r"step_000000001 is corrupt: state\.pt is not a torch\.save zip archive"):
        load_checkpoint(path)
    # A state.pt holding pickled objects (not written by save_checkpoint) is refused, naming the global.
    torch.save({"rng": np.random.get_state()}, path / "state.pt")
    rewrite_with_matching_meta(path, "state.pt", (path / "state.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"state\.pt: torch\.load\(weights_only=True\) refuses it "
                                              r"\(WeightsUnpickler error: Unsupported global.*numpy"):
        load_checkpoint(path)


def test_malicious_state_pt_refusal_never_suggests_weights_only_false(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = save(tmp_path, 1)
    torch.save({"x": Evil()}, path / "state.pt")
    rewrite_with_matching_meta(path, "state.pt", (path / "state.pt").read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "system" in message and "weights_only=False" not in message and "\n" not in message, message


def test_disk_full_while_writing_weights_is_one_checkpoint_error(tmp_path: Path, monkeypatch):
    """safetensors reports a failed write (ENOSPC) as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    import fvdm.train.checkpoint as C

    first = save(tmp_path, 1)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(C, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_000000002: No space left on device.*"
                                              r"free disk space"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing half-written left
    verify_checkpoint(first)


def test_no_usable_checkpoint_names_each_and_why(tmp_path: Path):
    save(tmp_path, 1)
    newer = save(tmp_path, 2)
    (newer / "meta.json").unlink()
    (tmp_path / "checkpoints" / "step_000000001" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_000000002 is incomplete.*"
                                              r"step_000000001 is incomplete"):
        load_checkpoint(tmp_path)


def test_unreadable_meta_json(tmp_path: Path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    (path / "meta.json").write_text('{"step": 2, "files": {')
    with pytest.raises(CheckpointError, match=r"step_000000002 is corrupt: meta\.json is not valid JSON "
                                              r"\(.* line 1 column.*previous good checkpoint is .*step_000000001"):
        verify_checkpoint(path)
    (path / "meta.json").write_text('{"step": 3, "files": {}}')
    with pytest.raises(CheckpointError, match="says step 3 but the directory is named step_000000002"):
        verify_checkpoint(path)


def test_missing_file_is_named(tmp_path: Path):
    path = save(tmp_path, 1)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000000001 is corrupt: state\.pt is missing"):
        load_checkpoint(path)


def test_missing_meta_json_means_incomplete_and_is_skipped_with_a_warning(tmp_path: Path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    (path / "meta.json").unlink()  # deleted (a killed save never leaves a step_* without it)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_000000001"]
    with pytest.warns(UserWarning, match=r"step_000000002 is incomplete: it has no meta\.json"):
        assert find_latest(tmp_path).name == "step_000000001"
    with pytest.raises(CheckpointError, match=r"step_000000002 is incomplete: it has no meta\.json"):
        load_checkpoint(path)


def test_path_errors_are_clear(tmp_path: Path):
    with pytest.raises(CheckpointError, match="checkpoint .*nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"file\.txt is a file, not a checkpoint directory"):
        load_checkpoint(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in .*empty: expected checkpoints/step_NNNNNNNNN"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"empty is not a checkpoint directory \(no meta\.json\)"):
        verify_checkpoint(tmp_path / "empty")
    assert issubclass(CheckpointError, UserError) and issubclass(UserError, ValueError)


# --------------------------------------------------------------------------------------------
# Killed writes, replacement, pruning


def test_leftover_work_dirs_are_ignored_then_cleaned(tmp_path: Path):
    save(tmp_path, 1)
    ckpts = tmp_path / "checkpoints"
    live_pid = os.getppid()  # alive, and not us
    leftovers = {
        f".tmp-step_000000002-{dead_pid()}-0badc0de": True,        # killed run: removed
        f".tmp-step_000000002-{os.getpid()}-00c0ffee": True,       # earlier run with our pid: removed
        f".trash-step_000000000-{dead_pid()}-5eed5eed": True,       # killed pruning: removed
        f".tmp-step_000000002-{live_pid}-11111111": False,         # a live writer: kept
        f".tmp-step_000000002-{live_pid}-22222222": True,          # live pid but days old: removed
    }
    for name in leftovers:
        # A complete-looking copy: readers must still ignore hidden directories.
        (ckpts / name).mkdir()
        for f in (ckpts / "step_000000001").iterdir():
            (ckpts / name / f.name).write_bytes(f.read_bytes())
    old = time.time() - 3 * 24 * 3600
    os.utime(ckpts / f".tmp-step_000000002-{live_pid}-22222222", (old, old))

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001"]
    assert find_latest(tmp_path).name == "step_000000001"
    save(tmp_path, 3)
    assert hidden_dirs(tmp_path) == sorted(n for n, removed in leftovers.items() if not removed)


def test_checkpoint_moved_aside_by_killed_replace_is_restored(tmp_path: Path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    expected = load_checkpoint(path).model
    # Killed after moving the old step_2 aside, before renaming the new one in.
    aside = path.parent / f".old-step_000000002-{dead_pid()}-abcdef12"
    os.rename(path, aside)
    assert find_latest(tmp_path).name == "step_000000001"
    save(tmp_path, 3)
    assert not aside.exists() and hidden_dirs(tmp_path) == []
    restored = load_checkpoint(path).model
    assert all(torch.equal(restored[k], expected[k]) for k in expected)


def test_same_step_is_replaced(tmp_path: Path):
    save(tmp_path, 5, seed=1)
    path = save(tmp_path, 5, seed=2)
    assert torch.equal(load_checkpoint(path).model["w"], small_model_state(2)["w"])
    assert hidden_dirs(tmp_path) == [] and len(list_checkpoints(tmp_path)) == 1


def test_keep_prunes_oldest_but_not_past_a_broken_one(tmp_path: Path):
    for step in range(1, 5):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000003", "step_000000004"]
    assert hidden_dirs(tmp_path) == []
    for step in range(5, 8):
        save(tmp_path, step, keep=0)
    assert len(list_checkpoints(tmp_path)) == 5

    # A truncated checkpoint does not count as one of the kept ones, and is not deleted.
    other = tmp_path / "other"
    save(other, 1, keep=2)
    broken = save(other, 2, keep=2)
    (broken / "state.pt").write_bytes(b"")
    save(other, 3, keep=2)
    assert [p.name for p in list_checkpoints(other)] == ["step_000000001", "step_000000002", "step_000000003"]
    save(other, 4, keep=2)
    assert [p.name for p in list_checkpoints(other)] == ["step_000000002", "step_000000003", "step_000000004"]


# --------------------------------------------------------------------------------------------
# Bad input and unwritable places


def test_bad_inputs_fail_before_writing(tmp_path: Path):
    with pytest.raises(TypeError, match=r"train_state holds objects torch\.load\(weights_only=True\) refuses"):
        save_checkpoint(tmp_path, 1, small_model_state(), None, {"rng": np.random.get_state()})
    assert os.listdir(tmp_path / "checkpoints") == []  # the half-written attempt is gone
    with pytest.raises(TypeError, match=r"model_state\['lr'\] is a float, not a tensor"):
        save_checkpoint(tmp_path, 1, {"lr": 0.1}, None, {})
    with pytest.raises(TypeError, match="config value .* not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, small_model_state(), None, {}, config={"f": object()})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save_checkpoint(tmp_path, -1, small_model_state(), None, {})
    with pytest.raises(ValueError, match="keep must be"):
        save_checkpoint(tmp_path, 1, small_model_state(), None, {}, keep=-1)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_run_dir_under_a_file_is_a_user_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"cannot write checkpoint .*file/run/checkpoints/step_000000001: Not a dir"):
        save(tmp_path / "file" / "run", 1)


def test_unwritable_run_dir_is_a_user_error(tmp_path: Path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o500)
    try:
        try:
            (run / "checkpoints" / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("permissions are not enforced here (running as root?)")
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*run/checkpoints/step_000000001: "
                                                  r"Permission denied.*make the run directory writable"):
            save(run, 1)
    finally:
        (run / "checkpoints").chmod(0o700)


# --------------------------------------------------------------------------------------------
# SIGKILL at random points


WRITER = textwrap.dedent("""
    import sys, torch
    from fvdm.train.checkpoint import find_latest, save_checkpoint
    run = sys.argv[1]
    step = int(find_latest(run).name[len("step_"):]) + 1
    weights = {"a": torch.randn(3 << 20), "b": torch.randn(1 << 20).half()}  # ~14 MB: a save takes ~50-100 ms
    print("ready", flush=True)
    while True:
        weights["a"][0] = step
        save_checkpoint(run, step, weights, {"a": weights["a"]}, {"step": step}, keep=2)
        step += 1
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path: Path):
    save_checkpoint(tmp_path, 0, {"a": torch.zeros(3)}, None, {"step": 0})
    env = {**os.environ, "PYTHONPATH": str(Path(fvdm.__file__).parents[1])}
    rng = random.Random(0)
    steps_seen = []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        # Every published checkpoint is complete and verifies; the latest is a good one.
        for ckpt in list_checkpoints(tmp_path):
            verify_checkpoint(ckpt)
        assert not any(p.name.startswith("step_") and not (p / "meta.json").exists()
                       for p in (tmp_path / "checkpoints").iterdir())
        latest = assert_no_warnings(find_latest, tmp_path)
        ckpt = load_checkpoint(latest)
        assert ckpt.state["step"] == ckpt.step
        steps_seen.append(ckpt.step)
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0  # progress was made and kept
    save_checkpoint(tmp_path, steps_seen[-1] + 1, {"a": torch.ones(3)}, None, {"step": 0})
    assert hidden_dirs(tmp_path) == []  # the killed writers' leftovers are gone
