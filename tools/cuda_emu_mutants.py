"""Shows that the CUDA emulation tests catch real kernel bugs.

Each mutant is one small bug put into a copy of the CUDA sources (a wrong mma fragment index,
a missing __syncthreads(), an off-by-one bound). For each, the emulation is rebuilt from the
copy (incrementally), the `cuda_emu` tests of tests/test_op_*.py (the operators on the emulated
device) run against it under AddressSanitizer, and the mutant counts as caught when the run
fails. Not part of CI: every mutant costs a rebuild.

    .venv/bin/python tools/cuda_emu_mutants.py [--only NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA = "csrc/kernels/cuda"

# name, file, text to replace (must occur exactly once), replacement, pytest -k selection
MUTANTS = [
    (
        "mma A fragment: a1 and a2 swapped",
        f"{CUDA}/temporal_attn_common.cuh",
        "  a[1] = ld32(p + 8 * kLd);\n  a[2] = ld32(p + 8);",
        "  a[1] = ld32(p + 8);\n  a[2] = ld32(p + 8 * kLd);",
        "temporal_attention",
    ),
    (
        "mma B fragment (V as B): rows 2t+8.. read from 2t..",
        f"{CUDA}/temporal_attn_common.cuh",
        "  b[1] = ld_pair(p + 8 * kLd, kLd);",
        "  b[1] = ld_pair(p, kLd);",
        "temporal_attention",
    ),
    (
        "missing __syncthreads() after the attention forward's tile loads",
        f"{CUDA}/temporal_attn_fwd.cu",
        "  }\n  __syncthreads();\n\n  const int warp",
        "  }\n\n  const int warp",
        "temporal_attention",
    ),
    (
        "missing first __syncthreads() of block_sum",
        f"{CUDA}/common.cuh",
        "  }\n  __syncthreads();\n#pragma unroll\n  for (int i = 0; i < M; ++i) {\n    float s = 0.f;",
        "  }\n#pragma unroll\n  for (int i = 0; i < M; ++i) {\n    float s = 0.f;",
        "adaln or gated or combine",
    ),
    (
        "missing trailing __syncthreads() of block_sum (shared memory reused too early)",
        f"{CUDA}/common.cuh",
        "  __syncthreads();  // smem may be reused right after",
        "",
        "adaln",
    ),
    (
        "off-by-one: attention forward stores the padded row F",
        f"{CUDA}/temporal_attn_fwd.cu",
        "      if (row >= F) continue;",
        "      if (row > F) continue;",
        "temporal_attention",
    ),
    (
        "off-by-one: frame combine backward chunk end",
        f"{CUDA}/combine_cuda.cu",
        "  const int64_t v1 = v0 + vecs_per_chunk < inner_vecs ? v0 + vecs_per_chunk : inner_vecs;",
        "  const int64_t v1 = v0 + vecs_per_chunk < inner_vecs ? v0 + vecs_per_chunk + 1 : inner_vecs + 1;",
        "combine",
    ),
    (
        "off-by-one: generic attention causal key bound",
        f"{CUDA}/temporal_attn_fwd.cu",
        "  const int64_t j_end = p.causal ? f + 1 : F;",
        "  const int64_t j_end = p.causal ? f : F;",
        "temporal_attention",
    ),
]


def run(cmd, **kw):
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the mutants whose name contains this")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    work = ROOT / "build" / "cuda-emu-mutants"
    src, bld = work / "src", work / "build"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for item in ("csrc", "cmake", "CMakeLists.txt", "pyproject.toml"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, src / item)
    py = sys.executable
    prefix = run([py, "-c", "import torch; print(torch.utils.cmake_prefix_path)"]).stdout.strip()
    cmake = str(Path(py).parent / "cmake")
    cfg = run([cmake, "-S", str(src), "-B", str(bld), "-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(py).parent / 'ninja'}",
               "-DFVDM_CUDA_EMULATION=ON",
               f"-DPython_EXECUTABLE={py}", f"-DCMAKE_PREFIX_PATH={prefix}"])
    if cfg.returncode:
        print(cfg.stdout, cfg.stderr)
        return 2
    cxx = os.environ.get("CXX", "g++")
    preload = " ".join(run([cxx, f"-print-file-name={lib}"]).stdout.strip() for lib in ("libasan.so", "libstdc++.so"))
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0", HYPOTHESIS_PROFILE="ci",
               FVDM_CUDA_EMU_LIB=str(bld / "libfvdm_cuda_emu.so"), PYTHONPATH=str(ROOT / "python"))
    results = []
    for name, rel, old, new, select in MUTANTS:
        if args.only and args.only not in name:
            continue
        path = src / rel
        original = path.read_text()
        assert original.count(old) == 1, f"{name}: the text to mutate occurs {original.count(old)} times in {rel}"
        path.write_text(original.replace(old, new))
        t0 = time.time()
        build = run([cmake, "--build", str(bld)])
        if build.returncode:
            outcome, detail = "does not compile", build.stdout[-400:]
        else:
            test = run([py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--capture=sys", "-m", "cuda_emu", "-k", select,
                        *map(str, sorted((ROOT / "tests").glob("test_op_*.py")))], env=env, cwd=ROOT)
            text = test.stdout + test.stderr
            outcome = "caught" if test.returncode else "MISSED"
            lines = [ln for ln in text.splitlines() if "ERROR: AddressSanitizer" in ln or ln.startswith("E  ")]
            detail = (lines[0] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]
            detail = f"exit status {test.returncode}: {detail}"
        path.write_text(original)
        results.append({"mutant": name, "outcome": outcome, "seconds": round(time.time() - t0, 1), "how": detail})
        print(f"{outcome:>8}  {name}  ({results[-1]['seconds']} s)\n          {detail}", flush=True)
    run([cmake, "--build", str(bld)])  # leave the copy built from unmutated sources
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["outcome"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
