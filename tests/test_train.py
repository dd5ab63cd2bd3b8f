"""The trainer end to end on a tiny config: outputs, exact resume after SIGKILL, SIGTERM saves,
DDP equivalence, refusal to clobber a run, corrupt checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
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
from fvdm.train.trainer import ClipOrder, lr_at, train

# Subprocesses import the same fvdm as this process (the CPU build, or the CUDA build that
# `make cuda-check` stages in build/cuda-pkg).
PKG_PARENT = str(Path(fvdm.__file__).resolve().parents[1])
TINY = [
    "model.size=T/2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2",
    "data.size=8", "data.num_frames=4", "data.num_videos=64", "train.batch_size=4", "train.lr=1e-3",
    "train.warmup_steps=2", "train.lr_schedule=cosine", "train.grad_clip=1.0", "train.ema_decay=0.9",
    "train.log_every=1", "train.sample_every=0", "train.sample_videos=2", "train.sample_steps=2",
    "diffusion.ptss_p=0.5", "diffusion.ptss_mode=sample", "sample.steps=3", "sample.num_videos=2",
    "train.precision=fp32",
    "model.self_condition=false",  # fast tiny runs; self-conditioning has its own tests
]


def tiny(*extra: str):
    return load_config("demo_cpu", TINY + list(extra))


SLOW_CLI = str(Path(__file__).with_name("slow_cli.py"))


def fvdm_command(step_delay: float = 0.0) -> list[str]:
    """`python -m fvdm`, or with step_delay: the same with a sleep after every training step."""
    return [sys.executable, *(["-m", "fvdm"] if not step_delay else [SLOW_CLI, str(step_delay)])]


def run_cli(*args: str, step_delay: float = 0.0, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    return subprocess.run([*fvdm_command(step_delay), *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(latest / "model.safetensors")


def assert_same_weights(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lr_schedule_and_clip_order():
    cfg = tiny("train.steps=10", "train.warmup_steps=4", "train.lr=1.0", "train.lr_min=0.1")
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] >= 0.1
    order = ClipOrder(10, seed=1)
    first_epoch = order.indices(0, 5, 0, 5) + order.indices(1, 5, 0, 5)
    assert sorted(first_epoch) == list(range(10))  # every item once per epoch
    assert ClipOrder(10, seed=1).indices(3, 5, 1, 4) == order.indices(3, 5, 1, 4)  # stateless in the step


def test_train_writes_outputs_and_refuses_to_clobber(tmp_path):
    run = tmp_path / "run"
    res = train(tiny("train.steps=4", "train.ckpt_every=2", "train.precision=bf16"), run, progress=False)
    assert res.step == 4 and res.checkpoint is not None and res.interrupted is None
    for f in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert (run / f).is_file(), f
    assert len(list((run / "samples").glob("step_*.png"))) == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"loss"' in lines[0]
    from fvdm.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        train(tiny("train.steps=4"), run, progress=False)
    # resuming a finished run does nothing more and keeps the weights
    before = final_weights(run)
    res = train(tiny("train.steps=4", "train.ckpt_every=2", "train.precision=bf16"), run, resume=True,
                progress=False)
    assert res.step == 4
    assert_same_weights(before, final_weights(run))


def test_sample_use_ema_picks_the_weights_and_the_flag_overrides_it(tmp_path):
    """sample.use_ema decides which weights load_run (so `sample`, `eval`) and the training
    previews use; --ema / --no-ema override it."""
    from fvdm.pipeline.runs import load_run

    run = tmp_path / "run"
    train(tiny("train.steps=3", "train.ckpt_every=3", "sample.use_ema=false"), run, progress=False)
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    raw, ema = load_file(latest / "model.safetensors"), load_file(latest / "ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # decay 0.9 over 3 steps: they differ

    def weights(loaded):
        return {k: v for k, v in loaded.model.state_dict().items() if k in raw}

    for use_ema, want, flag in ((None, raw, False), (True, ema, True), (False, raw, False)):
        loaded = load_run(run, use_ema=use_ema)
        assert loaded.ema is flag
        assert_same_weights(want, weights(loaded))
    for args, label in (([], "raw weights"), (["--ema"], "EMA weights")):
        result = run_cli("sample", "unconditional", "--run", str(run), "--num", "1", "--steps", "2", "--no-progress",
                         "--out", str(tmp_path / "s"), *args)
        assert result.returncode == 0, result.stderr
        assert label in " ".join(result.stdout.split())  # rich may wrap the line


def test_resume_after_sigkill_is_exact(tmp_path):
    """Uninterrupted 8 steps == 8 steps killed with SIGKILL after a checkpoint, then --resume."""
    args = TINY + ["train.steps=8", "train.ckpt_every=1"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert run_cli("train", "--no-progress", "--out", str(full), *args).returncode == 0

    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*fvdm_command(0.3), "train", "--no-progress", "--out", str(broken), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (broken / "checkpoints" / "step_000000003").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = sorted((broken / "checkpoints").glob("step_*"))
    assert steps_done and steps_done[-1].name < "step_000000008", "the run finished before it was killed"

    r = run_cli("train", "--no-progress", "--out", str(broken), "--resume", *args)
    assert r.returncode == 0, r.stderr
    assert_same_weights(final_weights(full), final_weights(broken))
    ema_a = load_file(sorted((full / "checkpoints").glob("step_*"))[-1] / "ema.safetensors")
    ema_b = load_file(sorted((broken / "checkpoints").glob("step_*"))[-1] / "ema.safetensors")
    assert_same_weights(ema_a, ema_b)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    run = tmp_path / "run"
    args = TINY + ["train.steps=50", "train.ckpt_every=1000"]
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*fvdm_command(0.2), "train", "--no-progress", "--out", str(run), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and ckpts[0].name < "step_000000050"
    r = run_cli("train", "--no-progress", "--out", str(run), "--resume", *TINY, "train.steps=5", "train.ckpt_every=1000")
    assert r.returncode == 0, r.stderr


def test_max_minutes_stops_with_a_checkpoint_and_resume_trains_the_rest(tmp_path):
    """train.max_minutes: a budget per invocation. The run stops at it with a checkpoint, exit
    status 0 (the demo goes on to sample), and --resume continues to train.steps."""
    run = tmp_path / "run"
    args = TINY + ["train.steps=40", "train.ckpt_every=1000", "train.max_minutes=0.02"]  # 1.2 s
    r = run_cli("train", "--no-progress", "--out", str(run), *args, step_delay=0.2)
    assert r.returncode == 0, r.stderr
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and "step_000000001" <= ckpts[0].name < "step_000000040"
    assert "max_minutes" in r.stdout + r.stderr
    r = run_cli("train", "--no-progress", "--out", str(run), "--resume", *TINY, "train.steps=40",
                "train.ckpt_every=1000")
    assert r.returncode == 0, r.stderr
    assert sorted((run / "checkpoints").glob("step_*"))[-1].name == "step_000000040"


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 4 == one process with batch 4."""
    args = TINY + ["train.steps=3", "train.ckpt_every=3", "train.precision=fp32"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("train", "--no-progress", "--out", str(one), *args).returncode == 0
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(port),
                        "-m", "fvdm", "train", "--no-progress", "--out", str(two), *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(one), final_weights(two), exact=False)


def test_corrupt_latest_checkpoint_falls_back_and_is_reported(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=4", "train.ckpt_every=2"), run, progress=False)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    latest = ckpts[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    r = run_cli("sample", "unconditional", "--run", str(run), "--ckpt", str(ckpts[-1]), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "corrupt" in r.stderr.lower(), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="step_000000004"):
        res = train(tiny("train.steps=6", "train.ckpt_every=2"), run, resume=True, progress=False)
    assert res.step == 6
    assert ckpts[-1].exists()  # the corrupt one is kept for inspection, not deleted


def test_class_conditional_training_on_a_video_folder(tmp_path):
    """Labels from root/<class>/<video>, label dropout, then guided sampling of a class."""
    from fvdm.io import pixels
    from fvdm.pipeline.generate import generate
    from fvdm.pipeline.runs import load_run

    for c, name in enumerate(("Archery", "Bowling")):
        for v in range(2):
            level = -0.8 + 1.6 * c
            video = torch.full((6, 3, 8, 8), level) + 0.1 * torch.linspace(0, 1, 6)[:, None, None, None]
            pixels.save_video(tmp_path / "data" / name / f"v{v}.mp4", video, fps=4, scale=1)
    run = tmp_path / "run"
    # self-conditioning too: its first pass sees only some clips, so their labels must follow
    cfg = tiny("data.kind=videos", f"data.root={tmp_path / 'data'}", "model.num_classes=2", "train.steps=2",
               "train.ckpt_every=2", "sample.guidance_scale=2.0", "model.self_condition=true")
    res = train(cfg, run, progress=False)
    assert res.step == 2
    loaded = load_run(run)
    out = generate(loaded.model, loaded.cfg, "unconditional", num_videos=2, steps=2, labels=torch.tensor([0, 1]))
    assert out.video.shape == (2, 4, 3, 8, 8) and torch.isfinite(out.video).all()
    bad = tiny("data.kind=videos", f"data.root={tmp_path / 'data'}", "model.num_classes=3")
    from fvdm.errors import UserError

    with pytest.raises(UserError, match="2 class"):
        train(bad, tmp_path / "run3", progress=False)


def test_training_and_sampling_on_vae_latents(tmp_path):
    """data.vae: clips are encoded once into the latent cache, the model works on latents, and
    sampling decodes back to pixels of the training size."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    from fvdm.pipeline.build import build_model
    from fvdm.pipeline.generate import generate
    from fvdm.pipeline.runs import load_run

    cfg = tiny(f"data.vae={tmp_path / 'vae'}", "data.num_videos=8", "train.steps=2", "train.ckpt_every=2")
    assert build_model(cfg).config.in_channels == 4 and build_model(cfg).config.input_size == 4
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert len(list((run / "latents").rglob("*.safetensors"))) == 8  # every clip encoded once
    loaded = load_run(run)
    out = generate(loaded.model, loaded.cfg, "i2v", num_videos=1, steps=2, codec=loaded.codec,
                   condition=torch.zeros(1, 1, 3, 8, 8))
    assert out.video.shape == (1, 4, 3, 8, 8) and torch.isfinite(out.video).all()


def first_step_loss(run: Path, *extra: str) -> float:
    """The logged loss of step 1 of a 2-step tiny run with these overrides."""
    train(tiny("train.steps=2", *extra), run, progress=False)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_min_snr_weighting_changes_the_loss_and_is_checked(tmp_path):
    plain, minsnr = first_step_loss(tmp_path / "plain"), first_step_loss(tmp_path / "minsnr", "diffusion.min_snr_gamma=5")
    # same seed, same batch, same noise: only the frame weights differ
    assert math.isfinite(minsnr) and minsnr != pytest.approx(plain, rel=1e-3)
    with pytest.raises(UserError, match="min_snr_gamma"):
        tiny("diffusion.min_snr_gamma=0")
    with pytest.raises(UserError, match="learn_sigma"):
        tiny("diffusion.min_snr_gamma=5", "model.learn_sigma=true")


def test_clean_prefix_training_holds_frames_and_is_checked(tmp_path):
    plain, prefix = first_step_loss(tmp_path / "plain"), first_step_loss(tmp_path / "prefix", "diffusion.clean_prefix_p=0.9")
    # same seed, batch, times and noise: held frames leave the loss and enter the model clean
    assert math.isfinite(prefix) and prefix != pytest.approx(plain, rel=1e-3)
    with pytest.raises(UserError, match="clean_prefix_p"):
        tiny("diffusion.clean_prefix_p=-0.1")
