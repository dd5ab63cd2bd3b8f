"""What a newcomer meets first: training precision picked from the hardware, honest progress
(ETA under a time cap, no `loss nan`, a plain word when the time guard stopped training),
`eval synthetic`'s bars, Ctrl-C and table, samples never overwritten, and CLI polish (-h
everywhere, no `<bool>` metavars, options a task ignores are errors, --device cuda without a
GPU names the option to use)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from rich.progress import Progress

import fvdm.cli
from fvdm.config import load_config
from fvdm.precision import CPU_BF16_FLAGS, choose_precision, cpu_bf16_features, resolve_precision
from fvdm.progress import EtaColumn, FieldColumn, capped_eta
from fvdm.train.trainer import TRAIN_LOG, Trainer, train
from test_cli import TINY, assert_one_line_error, cli, tree_digest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("first") / "run"
    train(load_config("demo_cpu", TINY + ["data.num_frames=8"]), run, progress=False)
    return run


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("requested, device, cpu, cuda, want", [
    ("auto", "cpu", (), False, "fp32"),  # the Xeon of issue 22, and AVX2-only hosts
    ("auto", "cpu", ("avx512_bf16",), False, "bf16"),
    ("auto", "cpu", ("amx_bf16",), False, "bf16"),
    ("auto", "cuda", (), True, "bf16"),
    ("auto", "cuda", ("avx512_bf16",), False, "fp32"),  # the GPU decides, not the host CPU
    ("auto", "mps", ("avx512_bf16",), False, "fp32"),
    ("fp32", "cpu", ("avx512_bf16",), True, "fp32"),
    ("bf16", "cpu", (), False, "bf16"),
    ("bf16", "cuda", (), False, "bf16"),
])
def test_auto_precision_is_bf16_only_on_native_bf16_hardware(requested, device, cpu, cuda, want):
    p = choose_precision(requested, device, cpu_bf16=cpu, cuda_bf16=cuda)
    assert p.name == want and p.requested == requested
    assert p.reason.startswith("auto:" if requested == "auto" else f"train.precision={requested}")
    assert (p.autocast_dtype is torch.bfloat16) == (want == "bf16")


def test_cpu_bf16_features_come_from_the_flags_line():
    base = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx2 avx512f avx512bw"
    assert cpu_bf16_features(base + "\n") == ()
    assert cpu_bf16_features(base + " avx512_bf16\n") == ("avx512_bf16",)
    assert cpu_bf16_features(base + " amx_tile amx_bf16 avx512_bf16\n") == CPU_BF16_FLAGS
    assert cpu_bf16_features("flags\t: avx512_bf16x\n") == ()  # whole words only


def test_training_says_and_records_its_precision(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--out", str(run), "--no-progress", *TINY, "train.precision=auto",
                         "train.steps=1")
    assert code == 0, err
    want = resolve_precision("auto", torch.device("cpu"))
    assert f"training on cpu in precision {want.name} (auto: " in out + err
    start, end = [json.loads(line) for line in (run / TRAIN_LOG).read_text().splitlines()]
    assert start["event"] == "start" and start["precision"] == want.name and start["precision_reason"] == want.reason
    assert start["precision_requested"] == "auto"
    assert end == {**end, "event": "end", "reason": "done", "step": 1}


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_forced_precision_is_what_the_step_computes_in(tmp_path, precision, dtype):
    trainer = Trainer(load_config("demo_cpu", TINY + [f"train.precision={precision}"]), tmp_path / precision,
                      progress=False)
    seen = []
    trainer.model.final_layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train_step(0)
    assert seen and set(seen) == {dtype}


# ----------------------------------------------------------------------------- progress


def test_eta_is_capped_by_the_deadline():
    assert capped_eta(100.0, None, 0.0) == (100.0, False)
    assert capped_eta(100.0, 1060.0, 1000.0) == (60.0, True)
    assert capped_eta(30.0, 1060.0, 1000.0) == (30.0, False)
    assert capped_eta(None, 1060.0, 1000.0) == (60.0, True)  # no rate yet: at most the cap
    assert capped_eta(100.0, 900.0, 1000.0) == (0.0, True)  # past the deadline


def _render(column, task) -> str:
    return column.render(task).plain


def test_bar_columns_eta_cap_and_no_nan_loss():
    clock = [0.0]
    progress = Progress(get_time=lambda: clock[0])
    capped = progress.add_task("train", total=1000, loss=None, deadline=600.0)
    free = progress.add_task("train", total=1000, loss=None, deadline=None)
    for t in range(0, 11):  # 1 step a second for 10 s: 990 s left by the rate
        clock[0] = float(t)
        progress.update(capped, completed=t)
        progress.update(free, completed=t)
    tasks = {t.id: t for t in progress.tasks}
    assert _render(FieldColumn("loss"), tasks[capped]) == "loss --"
    progress.update(capped, loss=float("nan"))
    assert _render(FieldColumn("loss"), tasks[capped]) == "loss --"
    progress.update(capped, loss=0.1234567)
    assert _render(FieldColumn("loss"), tasks[capped]) == "loss 0.1235"
    assert _render(EtaColumn(), tasks[capped]) == "ETA 0:09:50 (time cap)"
    assert _render(EtaColumn(), tasks[free]) == "ETA 0:16:30"


def test_time_guard_says_so_at_the_end_of_training_and_of_sampling(tmp_path, capsys, monkeypatch):
    import fvdm.train.trainer as trainer_module

    init = trainer_module.Trainer.__init__
    monkeypatch.setattr(trainer_module.Trainer, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "on_step": lambda step: time.sleep(0.2)}))
    monkeypatch.setenv("COLUMNS", "200")  # rich cuts the bar at 80 columns off a terminal, rate digits vary
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--out", str(run), *TINY, "train.steps=40", "train.ckpt_every=1000",
                         "train.max_minutes=0.01", "train.log_every=1000")
    assert code == 0, err
    bar = next(line for line in out.splitlines() if line.startswith("train "))  # its last render
    assert "(time cap)" in bar and "loss --" in bar and "nan" not in bar, bar
    step = int(re.search(r"stopped training at step (\d+) of 40", out).group(1))
    assert 1 <= step < 40
    assert "stopped early" in out and "under-trained" in out and "--resume" in out
    assert json.loads((run / TRAIN_LOG).read_text().splitlines()[-1])["reason"] == "max_minutes"
    code, out, err = cli(capsys, "sample", "unconditional", "--run", str(run), "--no-progress")
    assert code == 0, err
    last = " ".join(out.strip().splitlines()[-3:])
    assert f"trained {step} of 40 steps" in last and "time guard" in last and "--resume" in last
    code, out, err = cli(capsys, "sample", "unconditional", "--run", str(run.parent / "none"), "--no-progress")
    assert code != 0


def test_a_finished_run_samples_without_the_note(run_dir, capsys, tmp_path):
    code, out, err = cli(capsys, "sample", "rolling", "--run", str(run_dir), "--out", str(tmp_path / "r"),
                         "--no-progress")
    assert code == 0, err
    assert "note:" not in out


# ----------------------------------------------------------------------------- eval synthetic


@pytest.mark.filterwarnings("error")  # numpy's empty-slice / all-NaN warnings included
def test_eval_synthetic_bars_are_labelled_and_quiet(run_dir, capsys, tmp_path):
    """An under-trained model's videos (sprites missing in frames) go through every metric
    without a warning; each task has its own labelled bar with a rate and an ETA."""
    code, out, err = cli(capsys, "eval", "synthetic", "--run", str(run_dir), "--videos", "3", "--steps", "2",
                         "--no-i3d-fvd", "--out", str(tmp_path / "s.json"))  # the I3D has its own tests
    assert code == 0, err
    assert "warning" not in err.lower()
    for task in ("unconditional", "i2v", "interpolate", "extend", "long", "identity"):
        bar = next(line for line in out.splitlines() if f"eval {task}" in line)
        assert "3/3" in bar and "video/s" in bar and "ETA" in bar, bar
    assert ("inf" not in out) or "* inf:" in out


@pytest.mark.filterwarnings("error")
def test_metrics_of_videos_without_a_sprite_are_inf_not_warnings():
    """A long video whose sprite is gone from a whole window (the first or the last) has no
    colour to drift from: inf (reported with its explanation), never numpy's empty-slice warning."""
    from fvdm.data import MovingSprites
    from fvdm.eval.sprites import Thresholds
    from fvdm.eval.synthetic import _i2v_metrics, _long_metrics

    ds = MovingSprites(num_videos=2, num_frames=16, size=16, max_sprites=1, sprite_size=(0.3, 0.4), seed=3)
    videos = torch.stack([ds[0], ds[1]])
    videos[0, :8] = -1.0  # first window black
    videos[1, 8:] = -1.0  # last window black
    m = _long_metrics(videos, 8, 1, Thresholds())
    assert m["end_colour_drift"] == float("inf") and m["coherent"] == 0.0
    black = -torch.ones(2, 8, 3, 16, 16)
    assert _i2v_metrics(black, videos[:, :8], 1, Thresholds())["colour_error"] == float("inf")


def test_eval_synthetic_table_explains_inf(run_dir, capsys, monkeypatch, tmp_path):
    def fake(loaded, results, callback, tasks, **kw):
        results["i2v"] = {"model": {"colour_error": float("inf"), "area_error": 0.5}, "data": {"colour_error": 0.0}}

    monkeypatch.setattr("fvdm.eval.synthetic.evaluate_synthetic", fake)
    code, out, err = cli(capsys, "eval", "synthetic", "--run", str(run_dir), "--no-progress", "--tasks", "i2v",
                         "--out", str(tmp_path / "s.json"))
    assert code == 0, err
    assert "inf*" in out and "* inf: the tracker could not measure" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["results"]["i2v"]["model"]["colour_error"] is None


def test_eval_synthetic_ctrl_c_keeps_finished_tasks(run_dir, capsys, monkeypatch, tmp_path):
    import fvdm.eval.synthetic as synthetic

    real_generate = synthetic.generate

    def generate(model, cfg, task, **kw):
        if task == "interpolate":
            raise KeyboardInterrupt
        return real_generate(model, cfg, task, **kw)

    monkeypatch.setattr(synthetic, "generate", generate)
    out_json = tmp_path / "s.json"
    code, out, err = cli(capsys, "eval", "synthetic", "--run", str(run_dir), "--videos", "2", "--steps", "2",
                         "--no-i3d-fvd", "--no-progress", "--out", str(out_json))
    assert code == 130
    saved = json.loads(out_json.read_text())
    assert saved["interrupted"] is True and set(saved["results"]) == {"unconditional", "i2v"}
    assert "unconditional" in out and "interrupted: interpolate, extend, long, identity not evaluated" in out


# ----------------------------------------------------------------------------- sample: no overwrite


def test_sample_again_writes_a_new_numbered_folder(run_dir, capsys):
    samples = run_dir / "samples"
    code, out, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--no-progress")
    assert code == 0, err
    first = tree_digest(samples / "unconditional")
    assert first and f"-> {samples / 'unconditional'}/" in out
    for n in (2, 3):
        code, out, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--no-progress", "--seed",
                             str(n))
        assert code == 0, err
        assert f"writing to {samples / f'unconditional_{n}'}" in out
        assert (samples / f"unconditional_{n}" / "contact_sheet.png").is_file()
    assert tree_digest(samples / "unconditional") == first
    # `all` numbers every task alike: unconditional_4 is the first number free for all of them
    code, out, err = cli(capsys, "sample", "all", "--run", str(run_dir), "--no-progress")
    assert code == 0, err
    assert {p.name for p in samples.iterdir() if p.name.endswith("_4")} == {
        f"{t}_4" for t in ("unconditional", "i2v", "interpolate", "extend", "long", "rolling")}


# ----------------------------------------------------------------------------- CLI polish


def _commands():
    root = fvdm.cli.command()
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        out.append(path)
        for name, sub in (subs or {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return out


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_has_help_without_bool_metavars(capsys, flag):
    commands = _commands()
    assert ["sample"] in commands and ["eval", "synthetic"] in commands and ["bench", "kernels"] in commands
    for path in commands:
        code, out, err = cli(capsys, *path, flag)
        assert code == 0, (path, err)
        assert "Usage:" in out and "<bool>" not in out, (path, out)


def test_sample_help_says_defaults_come_from_the_run(capsys):
    code, out, err = cli(capsys, "sample", "-h")
    flat = " ".join(out.replace("│", " ").split())
    for key in ("sample.steps", "sample.method", "sample.noise_scale", "sample.stg_scale", "sample.seed"):
        assert f"the run's {key}" in flat, key
    assert "come from the run's config.yaml" in flat


@pytest.mark.parametrize("task, option, value", [
    ("unconditional", "--image", "x.png"), ("unconditional", "--frames", "12"), ("i2v", "--video", "x.mp4"),
    ("long", "--keyframes", "0,3"), ("extend", "--lag", "2"), ("rolling", "--frames", "9"),
    ("unconditional", "--conditioning", "replace"),
])
def test_an_option_the_task_ignores_is_an_error(capsys, tmp_path, task, option, value):
    code, _, err = cli(capsys, "sample", task, option, value, "--run", str(tmp_path / "no_run"))
    assert_one_line_error(code, err, option, task)


def test_guidance_on_a_model_without_classes_is_an_error(run_dir, capsys):
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--guidance", "2")
    assert_one_line_error(code, err, "--guidance", "num_classes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("args", [["sample", "unconditional"], ["eval", "loss"], ["eval", "synthetic"],
                                  ["bench", "model"], ["bench", "kernels"]])
def test_device_cuda_without_a_gpu_names_the_option_to_use(capsys, run_dir, args):
    extra = ["--run", str(run_dir)] if args[0] != "bench" else []
    code, _, err = cli(capsys, *args, "--device", "cuda", *extra)
    assert_one_line_error(code, err, "--device cuda", "use --device cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_train_device_cuda_without_a_gpu_names_the_key_to_use(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", str(tmp_path / "r"), *TINY, "train.device=cuda")
    assert_one_line_error(code, err, "train.device=cpu")
