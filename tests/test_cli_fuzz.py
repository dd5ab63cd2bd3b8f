"""Fuzz the command line: hypothesis draws option values and config overrides (NaN, inf,
negative, huge, wrong types, empty lists, strings, missing files) for `train`, `sample` and
`eval`. Whatever it draws, fvdm must answer with exit status 0 (it ran) or 2 (one line saying
what is wrong), never a Python traceback.

The CLI runs in this process through `fvdm.cli.main` (what `python -m fvdm` runs), which is
many times faster than a subprocess per example; an exception escaping `main` is exactly what
would print a traceback in a real process, so it fails the test with that traceback.

Values are drawn so that a valid one is also cheap (sizes 0..4, a few steps): refused values
cost nothing, and no example can start an hour of training."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import traceback
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fvdm.cli import main
from fvdm.config import Config, load_config

import helpers

TINY = [*helpers.TINY, "train.steps=1", "train.ckpt_every=1", "diffusion.num_timesteps=50"]
# CI runs the same 12 examples each (about a minute in all); FVDM_FUZZ_EXAMPLES=200 explores more.
FUZZ = settings(max_examples=int(os.environ.get("FVDM_FUZZ_EXAMPLES", "12")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_count = itertools.count()

# Numbers as a user might type them: special, negative, zero, huge, wrong types.
NASTY = st.sampled_from(["nan", "inf", "-inf", ".nan", "-1", "0", "-0.5", "1e12", "1000000000000", "abc", "",
                         "[]", "[1, 2]", "{}", "null", "true", "1.5", "0.0", "'3'"])
SMALL = st.sampled_from(["1", "2", "3", "0.5", "0.9", "1.0", "2.0"])
STRING_KEYS = ["model.size", "model.block_pattern", "model.backend", "data.kind", "data.root", "diffusion.schedule",
               "diffusion.objective", "diffusion.ptss_mode", "train.lr_schedule", "train.precision", "train.device",
               "sample.method", "data.sprites", "train.betas", "model.learn_sigma", "name", "nosuch.key", "model.nokey"]
WORDS = st.sampled_from(["", "foo", "T/2", "mini/2", "S", "ST", "J", "flow", "eps", "v", "x0", "cosine", "linear",
                         "cpu", "cuda", "tpu", "ddim", "ddpm", "euler", "sprites", "videos", "[0.9]", "{size: 3}",
                         "{bogus: 1}", "true", "null", "nan"])


def _numeric_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        if section.name != "name":
            hints = typing.get_type_hints(section.default_factory)
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.default_factory)
                     if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))]
    return sorted(keys)


def overrides():
    numeric = st.tuples(st.sampled_from(_numeric_keys()), st.one_of(NASTY, SMALL)).map(lambda kv: f"{kv[0]}={kv[1]}")
    stringy = st.tuples(st.sampled_from(STRING_KEYS), WORDS).map(lambda kv: f"{kv[0]}={kv[1]}")
    junk = st.sampled_from(["train.lr", "=", "a.b.c=1", "train=1", ".=", "train.lr==1"])
    return st.lists(st.one_of(numeric, numeric, stringy, junk), min_size=1, max_size=3)


def run(capsys, *args: str) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["fvdm", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # escaped main(): a traceback in a real process
        pytest.fail(f"`fvdm {' '.join(args)}` raised:\n{traceback.format_exc()}")
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    assert "Traceback (most recent call last)" not in out + err, (args, err)
    assert code in (0, 2), (args, code, err)
    if code == 2:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error:"), (args, err)
    return code, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fvdm.train.trainer import train

    run = tmp_path_factory.mktemp("fuzz") / "run"
    train(load_config("demo_cpu", TINY), run, progress=False)
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from fvdm.io import pixels
    root = tmp_path_factory.mktemp("files")
    pixels._save_png(root / "small.png", np.zeros((8, 8, 3), np.uint8))
    pixels._save_png(root / "big.png", np.zeros((16, 12, 3), np.uint8))
    (root / "junk.mp4").write_bytes(b"not a video")
    (root / "empty").mkdir()
    return {"small.png": root / "small.png", "big.png": root / "big.png", "junk.mp4": root / "junk.mp4",
            "empty": root / "empty", "missing": root / "missing.mp4"}


@FUZZ
@given(extra=overrides(), resume=st.booleans())
def test_train_never_tracebacks(capsys, tmp_path, run_dir, extra, resume):
    import shutil

    out = tmp_path / f"train{next(_count)}"
    if resume:  # a finished run: zero steps to train unless train.steps grew, so cheap
        shutil.copytree(run_dir, out)
    args = ["train", "--out", str(out), "--no-progress", *TINY, *extra] + (["--resume"] if resume else [])
    run(capsys, *args)


NUM = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "2", "1e12", "100000000000000000000", "x", "", "0.5"])
INT = st.sampled_from(["-1", "0", "1", "2", "3", "1000000000000", "x", "", "1.5", "4294967296"])


@st.composite
def sample_args(draw, files):
    task = draw(st.sampled_from(["unconditional", "i2v", "interpolate", "extend", "long", "rolling", "nope"]))
    args = [task]
    options = {
        "--steps": INT, "--num": INT, "--frames": INT, "--lag": INT, "--label": INT, "--seed": INT,
        "--eta": NUM, "--noise-scale": NUM, "--guidance": NUM, "--stg": NUM,
        "--method": st.sampled_from(["ddim", "ddpm", "euler", "foo", ""]),
        "--keyframes": st.sampled_from(["", ",", "0", "0,3", "0,1,2,3", "-1", "9", "a,b", "0,,2"]),
        "--conditioning": st.sampled_from(["hold", "replace", "x", ""]),
        "--device": st.sampled_from(["cpu", "auto", "tpu", "cuda:99", "", "meta"]),
        "--image": st.sampled_from(sorted(files)), "--video": st.sampled_from(sorted(files)),
        "--ckpt": st.sampled_from(["missing", "empty"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        value = draw(options[name])
        if name in ("--image", "--video", "--ckpt"):
            value = str(files[value])
        args += [name, value]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--ema", "--no-ema"])))
    return args


@FUZZ
@given(data=st.data())
def test_sample_never_tracebacks(capsys, tmp_path, run_dir, files, data):
    args = data.draw(sample_args(files))
    # Cheap whatever is drawn: one video of the tiny model, two sampler steps unless --steps says otherwise.
    if "--steps" not in args:
        args += ["--steps", "2"]
    if "--num" not in args:
        args += ["--num", "1"]
    if "--frames" not in args:
        args += ["--frames", "6"]
    run(capsys, "sample", *args, "--run", str(run_dir), "--out", str(tmp_path / f"s{next(_count)}"),
        "--no-progress")


@FUZZ
@example(which="synthetic", clips="1000000000000", seed="0", device="cpu", tasks="identity", ckpt=None)  # IndexError
@given(which=st.sampled_from(["loss", "synthetic"]), clips=INT, seed=INT,
       device=st.sampled_from(["cpu", "tpu", ""]), tasks=st.sampled_from(["identity", "i2v", "x", "", ","]),
       ckpt=st.sampled_from([None, "missing", "empty"]))
def test_eval_never_tracebacks(capsys, tmp_path, run_dir, files, which, clips, seed, device, tasks, ckpt):
    args = ["eval", which, "--run", str(run_dir), "--seed", seed, "--device", device]
    if which == "loss":
        args += ["--clips", clips]
    else:
        args += ["--videos", clips, "--tasks", tasks, "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / f"e{next(_count)}.json")]
    if ckpt is not None:
        args += ["--ckpt", str(files[ckpt])]
    run(capsys, *args)
