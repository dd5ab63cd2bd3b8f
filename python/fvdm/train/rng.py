"""Capture and restore every random number generator a training run draws from.

A resumed run continues exactly only if all generators continue where they stopped: Python's
`random`, NumPy's global generator, torch's CPU generator, each CUDA device's generator, and any
named generators the trainer owns (a data-order generator, a noise generator...).

The captured state holds only Python scalars, lists, dicts and CPU tensors, so it can be stored
in a checkpoint's `state.pt` and read back with `torch.load(weights_only=True)` (no pickled
NumPy arrays or arbitrary objects)."""

from __future__ import annotations

import random
import warnings
from typing import Any, Union

import numpy as np
import torch

from fvdm.errors import CheckpointError

# A named generator may be torch's or NumPy's new-style one (np.random.default_rng()).
Generator = Union[torch.Generator, np.random.Generator]

__all__ = ["capture_rng", "restore_rng"]


def capture_rng(generators: dict[str, Generator] | None = None) -> dict[str, Any]:
    """The state of every global generator plus the named `generators`, as plain data."""
    state: dict[str, Any] = {
        "python": _capture_python(),
        "numpy": _capture_numpy_global(),
        "torch": torch.get_rng_state(),
        # One state per visible device; empty on CPU-only machines (no CUDA initialisation).
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        state["generators"][name] = _capture_generator(name, gen)
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, Generator] | None = None) -> None:
    """Put every generator back into the state `capture_rng` returned.

    Each name in `generators` must be in the captured state; names captured but not passed
    are ignored (the caller no longer uses that generator)."""
    _restore_python(state["python"])
    _restore_numpy_global(state["numpy"])
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    _restore_cuda(state.get("cuda", []))
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            have = ", ".join(sorted(saved)) or "none"
            raise CheckpointError(f"the saved RNG state has no generator {name!r} (it has: {have}); "
                                  "resume with the same training code that wrote the checkpoint")
        _restore_generator(name, gen, saved[name])


def _capture_python() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _restore_python(saved: dict[str, Any]) -> None:
    random.setstate((saved["version"], tuple(saved["state"]), saved["gauss_next"]))


def _capture_numpy_global() -> dict[str, Any]:
    # The legacy global state is a tuple holding a uint32 array; store the array as a list.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"bit_generator": name, "keys": keys.tolist(), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _restore_numpy_global(saved: dict[str, Any]) -> None:
    keys = np.asarray(saved["keys"], dtype=np.uint32)
    np.random.set_state((saved["bit_generator"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count != len(states):
        # Resuming on another machine is legitimate, but the random stream will differ.
        warnings.warn(f"the checkpoint has RNG states for {len(states)} CUDA devices but {count} are visible; "
                      "restoring the first min(...) of them, so the run will not repeat exactly", stacklevel=3)
    for index in range(min(count, len(states))):
        torch.cuda.set_rng_state(_cpu_bytes(states[index]), index)


def _capture_generator(name: str, gen: Generator) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # bit_generator.state is a dict of str, int (PCG64's are 128-bit Python ints) and arrays.
        return {"kind": "numpy", "state": _numpy_to_plain(gen.bit_generator.state)}
    raise _not_a_generator(name, gen)


def _restore_generator(name: str, gen: Generator, saved: dict[str, Any]) -> None:
    kind = "torch" if isinstance(gen, torch.Generator) else "numpy" if isinstance(gen, np.random.Generator) else None
    if kind is None:
        raise _not_a_generator(name, gen)
    if saved["kind"] != kind:
        raise CheckpointError(f"the saved RNG state of generator {name!r} is a {saved['kind']} generator "
                              f"but a {kind} one was passed; resume with the same training code")
    if kind == "torch":
        gen.set_state(_cpu_bytes(saved["state"]))
    else:
        state = dict(saved["state"])
        bit_generator = type(gen.bit_generator).__name__
        if state.get("bit_generator") != bit_generator:
            raise CheckpointError(f"the saved RNG state of generator {name!r} is for {state.get('bit_generator')} "
                                  f"but the generator passed uses {bit_generator}")
        gen.bit_generator.state = _plain_to_numpy(state)


def _not_a_generator(name: str, gen: object) -> TypeError:
    return TypeError(f"generator {name!r} is a {type(gen).__name__}; expected torch.Generator or numpy.random.Generator")


def _numpy_to_plain(value: Any) -> Any:
    """NumPy arrays and scalars -> tagged lists and Python scalars, recursively."""
    if isinstance(value, dict):
        return {k: _numpy_to_plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain_to_numpy(value: Any) -> Any:
    """The inverse of `_numpy_to_plain`."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _plain_to_numpy(v) for k, v in value.items()}
    return value


def _cpu_bytes(state: torch.Tensor) -> torch.Tensor:
    # torch.load(map_location="cuda") moves every tensor; generator states must be CPU uint8.
    return state.detach().to("cpu", torch.uint8)
