"""The training loop: PTSS timesteps, AdamW, warmup, clipping, EMA, bf16, DDP, exact resume.

Every random draw of a step (timesteps, noise, label dropout) comes from a generator seeded by
(seed, step) and is drawn for the *global* batch, of which each process takes its slice; the
clips of a step are a pure function of (data seed, step) too. So:
- a resumed run repeats exactly what the uninterrupted run would have done (the step number is
  the whole data position);
- N processes with global batch B compute the same step as one process with batch B (up to
  the order of the gradient all-reduce).

Run directory: config.yaml, metrics.jsonl, loss.png, samples/step_*.png, checkpoints/step_*/.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fvdm.io import atomic, pixels, plots
from fvdm.pipeline.build import build_dataset, build_model, build_schedule, num_timesteps_for_training, resolve_device
from fvdm.config import Config, from_dict, read_config_file, save_config
from fvdm.diffusion import clean_prefix_mask, diffusion_loss, min_snr_weights, sample_timesteps
from fvdm.errors import UserError
from fvdm.precision import resolve_precision
from fvdm.train import distributed
from fvdm.train.checkpoint import (find_latest, load_checkpoint, save_checkpoint, scan_checkpoints,
                                   state_dict_mismatch)
from fvdm.train.lock import RunLock
from fvdm.train.ema import EMA

TRAIN_LOG = "train_log.jsonl"  # one line per start / end of a training invocation
STEP_SEED_STRIDE = 1_000_003  # (seed, step) -> one generator seed; a prime keeps runs apart


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then constant or cosine decay to train.lr_min."""
    tc = cfg.train
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * STEP_SEED_STRIDE + step)


class ClipOrder:
    """Which dataset items step s uses: epoch e is a permutation seeded by (seed, e); global
    sample k = s * B + j is item perm_e[k mod len] with e = k // len. Stateless in s."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed = length, seed
        self._epoch, self._perm = -1, None

    def indices(self, step: int, batch: int, start: int, stop: int) -> list[int]:
        out = []
        for j in range(start, stop):
            k = step * batch + j
            epoch = k // self.length
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * STEP_SEED_STRIDE + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.length, generator=g).tolist()
            out.append(self._perm[k % self.length])
        return out


class Diverged(Exception):
    """The loss or the gradients of a step (1-based) became non-finite; noticed at step
    `noticed` (the next step that reads the loss to the host), with nothing saved after it."""

    def __init__(self, step: int, what: str, noticed: int | None = None):
        super().__init__(f"step {step}: {what}")
        self.step, self.what, self.noticed = step, what, noticed if noticed is not None else step


class Health:
    """The first step (1-based) whose loss or gradient norm was not finite, with those two
    values, kept on the training device: record() costs no host sync, so a GPU step is never
    stalled for it; check() reads it (one sync) and raises Diverged. The trainer checks at every
    log step and before it writes anything (checkpoint, preview), so nothing saved comes from a
    step at or after the first bad one."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros((), dtype=torch.long, device=device)  # 0: every step finite so far
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        new = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first == 0)
        self.first = torch.where(new, step, self.first)
        self.loss = torch.where(new, loss.float(), self.loss)
        self.grad_norm = torch.where(new, grad_norm.float(), self.grad_norm)

    def check(self, now: int) -> None:
        first = int(self.first)
        if first:
            loss = float(self.loss)
            what = (f"the loss became {loss}" if not math.isfinite(loss)
                    else f"the gradient norm became {float(self.grad_norm)}")
            raise Diverged(first, what, now)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    interrupted: str | None = None  # name of the signal that stopped the run early
    time_limited: bool = False  # stopped at train.max_minutes before train.steps


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: str | Path | bool | None = None,
                 progress: bool = True, console=None, start_fresh: bool = False,
                 on_step: Callable[[int], None] | None = None):
        """resume: None (a new run: the directory must hold no checkpoints), True (the latest
        usable checkpoint of run_dir; none there yet: step 0), or a checkpoint path.
        start_fresh: with resume=True, train from step 0 when run_dir holds checkpoints of which
        none is usable (else that is refused, naming each and why). on_step(step): called after
        every training step with the number of steps done (tests slow the loop with it)."""
        self.cfg = cfg
        self.on_step = on_step
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.console = console
        self.lock = RunLock(self.run_dir)
        try:
            self._init(resume, start_fresh)
        except BaseException:
            self.close()
            raise

    def _init(self, resume, start_fresh: bool) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.train.device)
        self.world = distributed.init_world(device)
        self.device = distributed.local_device(device, self.world)
        tc = cfg.train
        if tc.batch_size % self.world.size:
            raise UserError(f"train.batch_size {tc.batch_size} must be divisible by the number of processes "
                            f"({self.world.size})")
        self.local_batch = tc.batch_size // self.world.size
        self.precision = resolve_precision(tc.precision, self.device)

        self.ckpt_to_load = self._prepare_run_dir(resume, start_fresh)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank and every run
        self.model = build_model(cfg).to(self.device)
        if self.model.y_embedder is not None:
            self.model.y_embedder.dropout_prob = 0.0  # drawn here per global batch instead
        self.schedule = build_schedule(cfg).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_warmup)
        # fused: one kernel over all parameters instead of one per tensor (~3x faster on the CPU)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tc.betas,
                                     weight_decay=tc.weight_decay, fused=True)
        self.dataset = build_dataset(cfg, self.run_dir, self.device)
        if len(self.dataset) == 0:
            raise UserError("the dataset is empty")
        self.order = ClipOrder(len(self.dataset), cfg.data.seed)
        self.step = 0
        self.health = Health(self.device)
        self.last_good: Path | None = None  # the newest checkpoint known good: loaded or saved here
        if self.ckpt_to_load is not None:
            self._load(self.ckpt_to_load)
        if self.world.is_main:
            # Written once the checkpoint is known to fit; not rewritten when unchanged (resume).
            save_config(self.cfg, self.run_dir / "config.yaml")
            dropped = atomic.truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= self.step)
            if dropped:
                self._log(f"metrics.jsonl: dropped {dropped} records of steps after {self.step} (written after "
                          "the checkpoint; they are trained again)")
        distributed.barrier(self.world)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.world.distributed else self.model)
        self._stop_signal: str | None = None

    # ------------------------------------------------------------------ run directory

    def close(self) -> None:
        """Release the run directory (also done by the OS if the process dies)."""
        self.lock.release()

    def _prepare_run_dir(self, resume, start_fresh: bool = False) -> Path | None:
        """Lock the run directory, refuse to mix a new run into an old one, and find the
        (verified) checkpoint to resume from."""
        if self.world.is_main:
            self.lock.acquire()  # before anything is read: another trainer may be writing
        ckpt_dir = self.run_dir / "checkpoints"
        cfg_file = self.run_dir / "config.yaml"
        self._scanned = False
        if start_fresh and resume is not True:
            raise UserError("--start-fresh goes with --resume (it says what to do when no checkpoint is usable)")
        if resume in (None, False):
            if ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*")):
                raise UserError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                                "or choose another --out")
            target = None
        elif resume is True:  # the latest good checkpoint of this run dir; none yet: step 0
            target, problems = scan_checkpoints(self.run_dir)
            self._scanned = True  # verified just now
            if target is None and problems:
                if not start_fresh:
                    raise UserError(f"--resume: no usable checkpoint in {ckpt_dir}: {'; '.join(problems)}. Pass "
                                    "--start-fresh as well to train from step 0 anyway (the unusable checkpoints "
                                    "stay on disk until replaced)")
                self._log(f"--start-fresh: no usable checkpoint in {ckpt_dir}; training from step 0")
            for problem in problems if target is not None else ():
                warnings.warn(f"{problem}; skipping it (left on disk for inspection)", stacklevel=2)
        else:
            target = Path(resume)
            if not target.exists():
                raise UserError(f"--resume {target}: no such checkpoint or run directory")
        if target is not None and cfg_file.is_file():
            self._check_same_model(cfg_file)
        return target

    def _check_same_model(self, cfg_file: Path) -> None:
        old = from_dict(read_config_file(cfg_file))
        if old.model != self.cfg.model or old.data.vae != self.cfg.data.vae:
            raise UserError(f"--resume: the model in {cfg_file} differs from the one configured now; "
                            "resume with the run's own config (its model section must not change)")

    # ------------------------------------------------------------------ checkpoints

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu", verify=not self._scanned)
        mismatch = state_dict_mismatch(self.model, ckpt.model)
        if mismatch:
            raise UserError(f"checkpoint {ckpt.path} does not fit this model: {mismatch}")
        try:
            self.model.load_state_dict(ckpt.model)
            self.ema.load_state_dict(ckpt.ema if ckpt.ema is not None else ckpt.model)
            self.opt.load_state_dict(ckpt.state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"checkpoint {ckpt.path} does not fit this model/optimizer: {str(e).splitlines()[0]}") from None
        self.step = int(ckpt.state["step"])
        self.last_good = ckpt.path
        self._log(f"resumed from {ckpt.path} at step {self.step}")

    def save(self) -> Path | None:
        self.health.check(self.step)  # never save weights from a diverged step
        path = None
        if self.world.is_main:
            # The step is the whole position: every draw of a step comes from (seed, step)
            # generators and its clips from (data seed, step), whatever the number of processes.
            state = {"optimizer": self.opt.state_dict(), "step": self.step}
            path = save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.ema.state_dict(), state,
                                   config=self.cfg.to_dict(), keep=self.cfg.train.keep_checkpoints or None)
            self.last_good = path
        distributed.barrier(self.world)
        return path

    # ------------------------------------------------------------------ one step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's clips of global step `step`: x0 (b, F, C, H, W) and labels or None."""
        lo = self.world.rank * self.local_batch
        items = [self.dataset[i] for i in self.order.indices(step, self.cfg.train.batch_size, lo, lo + self.local_batch)]
        if isinstance(items[0], (tuple, list)):
            x0 = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        else:
            x0, y = torch.stack(items), None
        if self.cfg.model.num_classes and y is None:
            raise UserError("model.num_classes > 0 needs a labelled dataset (class per video)")
        return x0, y

    def train_step(self, step: int) -> dict[str, float]:
        cfg, tc = self.cfg, self.cfg.train
        x0, y = self.batch(step)
        B, lo, hi = tc.batch_size, self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch
        g = step_generator(tc.seed, step)
        t = sample_timesteps(B, x0.shape[1], cfg.diffusion.ptss_p, num_timesteps=num_timesteps_for_training(cfg),
                             mode=cfg.diffusion.ptss_mode, generator=g, noise_bias=cfg.diffusion.noise_bias)[lo:hi]
        noise = torch.randn((B, *x0.shape[1:]), generator=g, dtype=x0.dtype)[lo:hi]
        drop = torch.rand(B, generator=g)[lo:hi] < cfg.model.class_dropout_prob
        # self-conditioning pass for half the clips (drawn only then: older runs keep their streams)
        # (kept on the host: diffusion_loss picks the rows from it without a device sync)
        self_cond = (torch.rand(B, generator=g)[lo:hi] < 0.5) if cfg.model.self_condition else None
        held = None  # drawn only when used, like self_cond
        if cfg.diffusion.clean_prefix_p > 0:
            held = clean_prefix_mask(B, x0.shape[1], cfg.diffusion.clean_prefix_p, generator=g)[lo:hi].to(self.device)
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        if y is not None:
            y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y).to(self.device)

        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dtype = self.precision.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        weights = None
        if cfg.diffusion.min_snr_gamma is not None:
            weights = min_snr_weights(cfg.diffusion.objective, *self.schedule.alpha_sigma(t), cfg.diffusion.min_snr_gamma)

        def model_fn(x, tt, *x_self, rows=None):  # rows: the clips of a self-conditioning first pass
            return self.ddp(x, tt, y if y is None or rows is None else y[rows], *x_self)

        with autocast:
            out = diffusion_loss(model_fn, self.schedule, x0, t,
                                 objective=cfg.diffusion.objective, noise=noise, learn_sigma=cfg.model.learn_sigma,
                                 held=held, self_condition=self_cond, frame_weights=weights, vb_t0=cfg.diffusion.vb_t0,
                                 ops=self.model.ops)
        loss = out.loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = tc.grad_clip if tc.grad_clip is not None and step >= tc.grad_clip_after else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.health.record(step + 1, loss.detach(), grad_norm.detach())
        self.opt.step()
        self.ema.update(self.model, step)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr}

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        try:
            return self._run()
        except Diverged as e:
            raise UserError(self._divergence_message(e)) from None

    def _divergence_message(self, e: Diverged) -> str:
        tc = self.cfg.train
        if self.last_good is not None:
            saved = f"the last checkpoint, {self.last_good}, is kept (nothing was saved after it)"
        else:
            saved = "no checkpoint was saved in this run"
        tries = [f"a lower train.lr (now {tc.lr:g})"]
        if tc.grad_clip is None:
            tries.append("train.grad_clip=1.0")
        if not tc.warmup_steps:
            tries.append("train.warmup_steps=100")
        if tc.precision != "fp32":
            tries.append("train.precision=fp32")
        resume = ", then --resume" if self.last_good is not None else ""
        noticed = (f" (noticed at step {e.noticed}: the loss is read every train.log_every steps)"
                   if e.noticed != e.step else "")
        return (f"training diverged at step {e.step}: {e.what}{noticed}; {saved}; metrics up to there are in "
                f"{self.run_dir / 'metrics.jsonl'}. Try {', '.join(tries)}{resume}")

    def _run(self) -> TrainResult:
        tc = self.cfg.train
        metrics_path = self.run_dir / "metrics.jsonl"
        last_ckpt = None
        handlers = self._install_signal_handlers()
        self._log(f"training on {self.device.type} in {self.precision.describe()}")
        self._record_session({"event": "start", "step": self.step, "steps": tc.steps, "device": str(self.device),
                              "threads": torch.get_num_threads(), "max_minutes": tc.max_minutes,
                              **self.precision.to_dict()})
        end = {"event": "end", "reason": "error"}
        try:
            with self._progress_bar() as bar:
                deadline = time.monotonic() + 60.0 * tc.max_minutes if tc.max_minutes else math.inf
                # the ETA column caps its estimate at the deadline (same clock: time.monotonic)
                task = bar.add_task("train", total=tc.steps, completed=self.step, loss=None,
                                    deadline=deadline if tc.max_minutes else None)
                window_t0, window_steps = time.perf_counter(), 0
                time_limited = False
                while self.step < tc.steps:
                    self.model.train()
                    stats = self.train_step(self.step)
                    self.step += 1
                    window_steps += 1
                    if self.on_step is not None:
                        self.on_step(self.step)
                    # The loss is read to the host only here, every log_every steps.
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        self.health.check(self.step)
                        stats = distributed.mean_over_ranks(stats, self.world)
                        elapsed = time.perf_counter() - window_t0
                        record = {"step": self.step, "loss": float(stats["loss"]), "grad_norm": float(stats["grad_norm"]),
                                  "lr": stats["lr"], "it_per_s": window_steps / max(elapsed, 1e-9), "time": time.time()}
                        window_t0, window_steps = time.perf_counter(), 0
                        if self.world.is_main:
                            atomic.append_jsonl(metrics_path, record)
                        bar.update(task, loss=record["loss"])
                    bar.update(task, completed=self.step)
                    stop = distributed.any_flag(self._stop_signal is not None, self.world, self.device)
                    time_limited = tc.max_minutes is not None and self.step < tc.steps and distributed.any_flag(
                        time.monotonic() > deadline, self.world, self.device)  # at the last step it simply ends
                    if self.step % tc.ckpt_every == 0 or self.step == tc.steps or stop or time_limited:
                        last_ckpt = self.save()
                        self._write_plots(metrics_path)
                    if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                        self.preview()
                    if stop:
                        end = {"event": "end", "reason": self._stop_signal or "signal", "step": self.step}
                        self._log(f"{self._stop_signal or 'signal'}: saved {last_ckpt} at step {self.step}; "
                                  f"continue with --resume")
                        return TrainResult(self.run_dir, self.step, last_ckpt, self._stop_signal or "signal")
                    if time_limited:
                        end = {"event": "end", "reason": "max_minutes", "step": self.step}
                        self._log(f"train.max_minutes={tc.max_minutes} reached at step {self.step} of {tc.steps}: "
                                  f"saved {last_ckpt}; --resume trains the rest")
                        break
            if last_ckpt is None:  # resumed a finished run: nothing to do
                last_ckpt = find_latest(self.run_dir)
            if not time_limited:
                end = {"event": "end", "reason": "done", "step": self.step}
            self.preview()
            return TrainResult(self.run_dir, self.step, last_ckpt, time_limited=time_limited)
        finally:
            self._record_session({**end, "step": self.step})
            self._restore_signal_handlers(handlers)

    def _record_session(self, record: dict) -> None:
        """One line per start and end of a training invocation in <run>/train_log.jsonl: where
        and in which precision it trained (and why), and how it ended (done, max_minutes, a
        signal, error)."""
        if self.world.is_main:
            import datetime

            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            atomic.append_jsonl(self.run_dir / TRAIN_LOG, {"time": now, **record})

    def preview(self) -> Path | None:
        """A grid of samples (rows: videos, columns: frames) in samples/step_*.png, from the
        weights `sample` uses (sample.use_ema: the EMA or the raw ones)."""
        self.health.check(self.step)
        if not self.world.is_main:
            distributed.barrier(self.world)
            return None
        from fvdm.pipeline.generate import Codec, generate

        tc = self.cfg.train
        codec = Codec(getattr(self.dataset, "vae", None))  # latents are decoded to pixels
        model = self.ema.model if self.cfg.sample.use_ema else self.model
        training = model.training
        videos = generate(model, self.cfg, "unconditional", num_videos=tc.sample_videos,
                          steps=tc.sample_steps, seed=tc.seed, device=self.device, codec=codec)
        model.train(training)  # generate() put it in eval mode
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        pixels.save_contact_sheet(path, videos.video, held=videos.held)
        distributed.barrier(self.world)
        return path

    def _write_plots(self, metrics_path: Path) -> None:
        if self.world.is_main and metrics_path.exists():
            records = atomic.read_jsonl(metrics_path)
            if records:
                plots.save_loss_curve(self.run_dir / "loss.png", records)

    # ------------------------------------------------------------------ signals, output

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    def _progress_bar(self):
        from fvdm.progress import progress_bar

        return progress_bar("train", fields=("loss",), console=self.console,
                            disable=not (self.progress and self.world.is_main))

    def _log(self, msg: str) -> None:
        """Events worth a line even without a progress bar (resume, stop); rank 0 only."""
        if self.world.is_main:
            from rich.console import Console

            (self.console or Console(stderr=True)).print(msg, highlight=False, soft_wrap=True)


def train(cfg: Config, run_dir: str | Path, resume=None, progress: bool = True,
          start_fresh: bool = False, on_step: Callable[[int], None] | None = None) -> TrainResult:
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, start_fresh=start_fresh, on_step=on_step)
    try:
        return trainer.run()
    finally:
        trainer.close()
        distributed.shutdown(trainer.world)


__all__ = ["Trainer", "TrainResult", "train", "lr_at", "ClipOrder", "step_generator"]
