"""bench.common: variants timed in alternation (ratios paired per round), the machine description."""

from __future__ import annotations

import time

import pytest
import torch

from fvdm.bench.common import time_paired


def test_paired_ratio_holds_under_host_drift():
    # A "host" that gets 4x slower halfway through: both variants slow down together, b always
    # takes twice as long as a. The paired ratio stays 2; after the warm-up, the variants take
    # turns of 1 + 2 calls.
    calls: list[str] = []
    slow = {"factor": 1.0}

    def variant(name: str, ms: float):
        def run():
            calls.append(name)
            if len(calls) > 2 * 3 + 2 * 3 * 6:  # after warm-up and six rounds
                slow["factor"] = 4.0
            time.sleep(ms * slow["factor"] / 1e3)
        return run

    ms, ratios = time_paired({"a": variant("a", 2.0), "b": variant("b", 4.0)}, torch.device("cpu"),
                             warmup=3, min_rounds=12, min_seconds=0.0, turn=2)
    assert calls[:6] == ["a"] * 3 + ["b"] * 3  # warm-up of each
    assert calls[6:] == (["a"] * 3 + ["b"] * 3) * ((len(calls) - 6) // 6)  # then rounds of turns
    assert set(ms) == {"a", "b"} and set(ratios) == {"b"}
    assert ratios["b"] == pytest.approx(2.0, rel=0.2)
    assert ms["b"] > ms["a"]


def test_machine_info_names_the_cpu_flags_that_tell_hosts_apart():
    from pathlib import Path

    from fvdm.bench.common import _NOTABLE_CPU_FLAGS, machine_info

    info = machine_info(torch.device("cpu"))
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        assert "cpu_flags" not in info
        return
    flags = next(line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    assert info["cpu_flags"] == [f for f in _NOTABLE_CPU_FLAGS if f in flags]
