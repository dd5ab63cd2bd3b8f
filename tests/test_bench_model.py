"""bench model: the profile split classifies operators correctly and bounds the fused ops' gain."""

from __future__ import annotations

import pytest

from fvdm import HAS_C
from fvdm.bench import model as mb


def test_op_class_names():
    assert mb.op_class("aten::mm") == mb.op_class("aten::addmm") == "linear"
    assert mb.op_class("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "sdpa"
    assert mb.op_class("fvdm::temporal_attention") == "fvdm"
    assert mb.op_class("GeneratedBackwardFor_fvdm_gated_residual_default") == "fvdm"
    assert mb.op_class("aten::copy_") == mb.op_class("aten::gelu") == "other"


def test_fused_ops_free_speedup_is_reference_over_fused_without_fvdm():
    # fused: Linear costed as in the reference (60), its SDPA and the rest (10 + 10), fvdm ops free
    rows = [{"variant": "fused", "train_step_profile_ms": {"linear": 64.0, "sdpa": 10.0, "fvdm": 20.0, "other": 10.0}},
            {"variant": "reference", "train_step_profile_ms": {"linear": 60.0, "sdpa": 15.0, "fvdm": 0.0, "other": 45.0}}]
    assert mb.fused_ops_free_speedup(rows) == pytest.approx(120.0 / 80.0)
    assert mb.fused_ops_free_speedup(rows[:1]) is None


@pytest.mark.skipif(not HAS_C, reason="fvdm._C is not built")
def test_profiled_run_splits_a_real_step():
    cfg = mb.ModelBenchConfig(size="T/2", frames=4, latent_size=16, steps=1, warmup=1, profile=True)
    rows = {r["variant"]: r for r in mb.run(cfg, ["fused", "reference"])}
    fused, ref = rows["fused"]["train_step_profile_ms"], rows["reference"]["train_step_profile_ms"]
    assert set(fused) == set(ref) == set(mb.OP_CLASSES)
    assert fused["fvdm"] > 0 and ref["fvdm"] == 0  # only the fused backend runs our operators
    assert fused["linear"] > 0 and ref["linear"] > 0 and ref["sdpa"] > 0
    assert mb.fused_ops_free_speedup(list(rows.values())) > 0
