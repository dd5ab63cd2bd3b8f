"""The maintenance scripts in tools/ start and refuse cleanly where they cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole check")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "no CUDA device" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_mutant_texts_are_found_once_in_the_cuda_sources():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cuda_emu_mutants as m
    finally:
        sys.path.pop(0)
    for name, rel, old, new, _ in m.MUTANTS:
        text = (ROOT / rel).read_text()
        assert text.count(old) == 1, f"mutant '{name}': its text occurs {text.count(old)} times in {rel}"
        assert old != new
