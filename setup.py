"""Builds fvdm._C with CMake + ninja against the installed torch.

Environment:
  FVDM_CUDA=auto|0|1     compile the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0"
  FVDM_NATIVE=1|0        tune CPU kernels for this machine (-march=native), default 1
  FVDM_BUILD_TYPE        CMake build type, default Release
  FVDM_JOBS              parallel compile jobs, default: ninja's choice
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    if candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


def _want_cuda(torch) -> bool:
    mode = os.environ.get("FVDM_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"FVDM_CUDA must be auto, 0 or 1, got {mode!r}")
    have_torch_cuda = torch.version.cuda is not None
    nvcc = _find_nvcc()
    if mode == "0":
        return False
    if mode == "1":
        if not have_torch_cuda:
            raise SystemExit("FVDM_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None)")
        if nvcc is None:
            raise SystemExit("FVDM_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return have_torch_cuda and nvcc is not None


def _cmake() -> str:
    """The cmake installed next to this Python (pip's `cmake`) when there is one. An older
    system cmake (3.25 here) does not know nvcc 13's C++20 flags and fails with FVDM_CUDA=1."""
    local = Path(sys.executable).parent / "cmake"
    return str(local) if local.exists() else "cmake"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        with_cuda = _want_cuda(torch)
        # One fixed folder per (Python, torch, CUDA) keeps ninja incremental across `pip install
        # -e .` runs without mixing CMake caches of different torch builds.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '-')}"
        build_dir = ROOT / "build" / f"cmake-{tag}{'-cuda' if with_cuda else ''}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FVDM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFVDM_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DFVDM_NATIVE={'ON' if os.environ.get('FVDM_NATIVE', '1') == '1' else 'OFF'}",
            f"-DFVDM_VERSION={self.distribution.get_version()}",
            "-GNinja",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}")
        if shutil.which("ccache"):
            args.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
            if with_cuda:
                args.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
        env = os.environ.copy()
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        subprocess.run([_cmake(), "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        build = [_cmake(), "--build", str(build_dir)]
        if os.environ.get("FVDM_JOBS"):
            build += ["-j", os.environ["FVDM_JOBS"]]
        subprocess.run(build, check=True, env=env)


setup(ext_modules=[CMakeExtension("fvdm._C")], cmdclass={"build_ext": CMakeBuild}, package_dir={"": "python"})
