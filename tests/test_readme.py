"""The README matches the machine: every `python -m fvdm ...` line of its code blocks runs as
written, in order, in a fresh folder (so `runs/demo_cpu` is the run the first line trains),
with a tiny model in place of the demo's (the same 8-frame window) and, for benchmarks, up to
their argument checks. The prerequisites come before the two commands, and the README says
what the schedule plot says about held frames."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from fvdm.io import plots
from helpers import TINY, cli

README = Path(__file__).resolve().parents[1] / "README.md"

# The demo's window (8 frames: --keyframes 0,3,7 must fit it) on the tiny model of the CLI tests,
# sampled in one step without temporal guidance (every later command reads the run's config).
TRAIN_OVERRIDES = [*TINY, "data.num_frames=8", "train.steps=2", "sample.steps=1", "sample.stg_scale=0",
                   "sample.order_scale=0", "train.sample_steps=1"]


class _Stop(Exception):
    """Raised where a benchmark would start measuring: its arguments were accepted."""


# Benchmarks take minutes: the function that starts the work stops them instead.
STOP_AT = {("bench", "kernels"): "fvdm.bench.kernels.plan", ("bench", "model"): "fvdm.bench.model.run",
           ("bench", "i3d"): "fvdm.bench.i3d.run"}


def readme_commands() -> list[list[str]]:
    """The arguments of each `python -m fvdm` line in the README's bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "fvdm"]:
                commands.append(words[3:])
    return commands


def test_readme_commands_are_found():
    commands = readme_commands()
    firsts = {tuple(c[:2]) for c in commands}
    assert {("train", "--config"), ("sample", "all"), ("sample", "i2v"), ("sample", "interpolate"),
            ("eval", "synthetic"), ("bench", "kernels")} <= firsts, firsts
    assert len(commands) >= 10


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for path, stop in STOP_AT.items():
        module, name = stop.rsplit(".", 1)

        def halt(*args, _what=" ".join(path), **kwargs):
            raise _Stop(_what)

        monkeypatch.setattr(f"{module}.{name}", halt)
    ran = []
    for args in readme_commands():
        if args[0] == "train":
            args = [*args, *TRAIN_OVERRIDES]
        if args[:2] == ["eval", "synthetic"]:  # 96 clips through the I3D: tests/test_eval_synthetic.py has it
            args = [*args, "--no-i3d-fvd"]
        try:
            code, out, err = cli(capsys, *args)
        except _Stop:
            ran.append(f"{' '.join(args)}: checked")
            continue
        if code != 0 and args[:2] == ["bench", "kernels"] and "--device" in args and not torch.cuda.is_available():
            assert "--device cuda" in err and "use --device cpu" in err, err  # the one thing to change
            continue
        assert code == 0, (args, err)
        ran.append(" ".join(args))
    assert any(a.startswith("sample interpolate") for a in ran), ran
    assert (tmp_path / "runs" / "demo_cpu" / "samples" / "interpolate_2" / "contact_sheet.png").is_file()


def test_prerequisites_come_before_the_two_commands():
    text = README.read_text()
    needs, first_block = text.find("Needs: "), text.find("```bash\nmake demo")
    assert 0 <= needs < first_block
    line = text[needs:first_block]
    for word in ("Python >= 3.10", "venv", "C++20", "disk"):
        assert word in line, word


def test_pip_way_pins_a_cpu_torch_and_tells_about_cuda():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    pinned = re.search(r"TORCH_SPEC \?= (torch==\S+)", makefile).group(1)
    assert f"pip install {pinned} --index-url https://download.pytorch.org/whl/cpu" in text
    assert "nvcc" in text and "FVDM_CUDA=0 pip install" in text


def test_schedule_plot_and_readme_agree_on_the_clean_time():
    flat = " ".join(README.read_text().split())
    sentence = flat[flat.index("in `schedule.png` their column"):][:300]
    assert "t = -1" in sentence and "shown them at t = 0" in sentence
    assert "-1 = clean" in plots.SCHEDULE_LABELS["ddpm"]
    assert "t = -1" in plots.HELD_LABELS["ddpm"] and "sees t = 0" in plots.HELD_LABELS["ddpm"]
