"""The whole GPU validation in one run, for the minutes a GPU is available (`make gpu-check`).

Steps, each with its own time limit inside an overall budget (default 9 minutes; the build
before it is `make gpu-check`'s): the build info; the `cuda` tests; compute-sanitizer memcheck
and racecheck over a few derandomized examples of the CUDA kernel tests (the caching allocator
off, so memcheck sees every allocation's bounds); `bench kernels` and `bench model` on the GPU.
Everything, passed or not, goes into benchmarks/results/gpu-check-<device>.json, written
atomically; the exit status is 0 only when every step passed.

    python tools/gpu_check.py [--budget SECONDS] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sanitizer() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (Path(home) / "bin" / "compute-sanitizer", Path(home) / "compute-sanitizer" / "compute-sanitizer"):
        if cand.exists():
            return str(cand)
    return shutil.which("compute-sanitizer")


def step(name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True, capture_output=True,
                           timeout=limit)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    result = {"step": name, "command": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1),
              "passed": rc == 0, "output_tail": out[-4000:]}
    print(f"[{'ok' if rc == 0 else 'FAIL'}] {name} ({result['seconds']} s)", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu-check-<device>.json)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible to this torch; run it on a GPU machine", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{slug}.json"
    deadline = time.time() + args.budget
    cs = sanitizer()
    tmp = Path(tempfile.mkdtemp(prefix="fvdm-gpu-check-"))
    few = {"HYPOTHESIS_PROFILE": "sanitizer", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "FVDM_SELF_CHECK": "0"}
    kernel_tests = [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_op_modulate.py",
                    "tests/test_op_noise.py", "tests/test_op_temporal_attention.py", "-k", "forward_and_backward or attention"]
    plan = [
        ("build info", [PY, "-m", "fvdm", "info"], 60, None),
        ("cuda tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"], 180, None),
        ("compute-sanitizer memcheck", [cs, "--tool", "memcheck", "--error-exitcode", "1", *kernel_tests], 150, few),
        ("compute-sanitizer racecheck", [cs, "--tool", "racecheck", "--error-exitcode", "1", *kernel_tests[:-1],
                                         "attention or adaln"], 150, few),
        ("bench kernels", [PY, "-m", "fvdm", "bench", "kernels", "--device", "cuda", "--out", str(tmp / "k.json")], 120,
         None),
        ("bench model", [PY, "-m", "fvdm", "bench", "model", "--device", "cuda", "--out", str(tmp / "m.json")], 90, None),
    ]
    steps = []
    for label, cmd, limit, env in plan:
        left = deadline - time.time()
        if cmd[0] is None:
            steps.append({"step": label, "passed": False, "rc": None, "output_tail": "compute-sanitizer not found"})
            print(f"[FAIL] {label}: compute-sanitizer not found (set CUDA_HOME)", flush=True)
            continue
        if left < 10:
            steps.append({"step": label, "passed": False, "rc": None, "output_tail": "not run: the budget was spent"})
            continue
        steps.append(step(label, cmd, min(limit, left), env))
    report = {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passed": all(s["passed"] for s in steps),
        "steps": steps,
        "bench_kernels": json.loads((tmp / "k.json").read_text()) if (tmp / "k.json").exists() else None,
        "bench_model": json.loads((tmp / "m.json").read_text()) if (tmp / "m.json").exists() else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".json.part")
    part.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(part, out)
    print(f"gpu-check: {'passed' if report['passed'] else 'FAILED'}; wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
