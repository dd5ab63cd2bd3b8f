"""A training step reads nothing from the training device to the host (the GPU never waits for
Python) except at log steps, where the loss, the gradient norm and the divergence flag are
read. On the CPU every tensor lives on the host, so the test makes Python's ways of reading a
tensor (item, bool, int, float, tolist, numpy, ...) raise during the device part of each step;
the data loading of a step (Trainer.batch) happens on the host by design and is exempt."""

from __future__ import annotations

import pytest
import torch

from fvdm.config import load_config
from fvdm.ops.selfcheck import self_check_enabled, set_self_check
from fvdm.train.trainer import Trainer
from helpers import TINY

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__", "__format__")


class HostReads:
    """Patches torch.Tensor's reads: inside a guarded region they raise, in an exempt one
    (data loading) they pass, elsewhere they pass and are noted with the step they follow."""

    def __init__(self, monkeypatch):
        self.guarded = self.exempt = False
        self.step = 0
        self.at: list[int] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.exempt:
                return original(tensor, *args, **kwargs)
            if self.guarded:
                raise AssertionError(f"host read Tensor.{name} inside training step {self.step + 1}")
            self.at.append(self.step)
            return original(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("extra", [[], ["model.self_condition=true", "diffusion.clean_prefix_p=0.5"],
                                   ["model.learn_sigma=true", "diffusion.schedule=linear", "diffusion.objective=eps"]],
                         ids=["plain", "self-condition", "learn-sigma"])
def test_training_steps_read_the_device_only_at_log_steps(tmp_path, monkeypatch, extra):
    cfg = load_config("demo_cpu", [*TINY, "train.steps=6", "train.log_every=3", "train.ckpt_every=6",
                                   "train.sample_every=0", *extra])
    enabled = self_check_enabled()
    set_self_check(False)  # the fused kernels' one-time self-check compares on the host
    try:
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        reads = HostReads(monkeypatch)
        step_fn, batch_fn = trainer.train_step, trainer.batch

        def guarded_step(step):
            reads.step, reads.guarded = step, True
            try:
                return step_fn(step)
            finally:
                reads.guarded = False

        def host_batch(step):  # data loading: on the host by design
            reads.exempt = True
            try:
                return batch_fn(step)
            finally:
                reads.exempt = False

        trainer.train_step, trainer.batch = guarded_step, host_batch
        trainer.on_step = lambda done: setattr(reads, "step", done)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    finally:
        set_self_check(enabled)
    assert result.step == 6
    # outside the steps, the loop reads only after the log steps 3 and 6 (then saves, previews)
    assert reads.at and set(reads.at) <= {3, 6}, sorted(set(reads.at))
