"""The video DiT's configuration: one dataclass, the `model` section of a run's config and the
argument of Latte.

A run's config names a size preset and may override its architecture fields; the data decide
the geometry (frame size, channels, frames). `resolved()` is the one place both are filled in:

    ModelConfig(size="S/2", depth=8).resolved(input_size=32, in_channels=4, num_frames=16)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from fvdm.ops import BACKENDS

# name -> (depth, hidden_size, num_heads, patch_size); patch size after the slash, as in DiT / Latte.
LATTE_SIZES: dict[str, tuple[int, int, int, int]] = {
    "XL/2": (28, 1152, 16, 2),
    "L/2": (24, 1024, 16, 2),
    "B/2": (12, 768, 12, 2),
    "S/2": (12, 384, 6, 2),
    "mini/2": (6, 128, 4, 2),  # CPU demo size
    "T/2": (4, 64, 4, 2),  # tests
}
GELU_FORMS = ("exact", "tanh")
# S spatial (within a frame), T temporal (along frames at one token), J joint space-time (all
# F*N tokens of a clip)
BLOCK_KINDS = ("S", "T", "J")
# The geometry of a model built outside a run (tests, benchmarks), when not given: SD-VAE
# latents of 256-pixel video, 16 frames.
DEFAULT_GEOMETRY = {"input_size": 32, "in_channels": 4, "num_frames": 16}
_PRESET = ("depth", "hidden_size", "num_heads", "patch_size")
_FROM_DATA = {"from_data": True}  # field metadata: set by the data, never by a run's config


@dataclass
class ModelConfig:
    size: str = "mini/2"  # a preset of LATTE_SIZES: S/2 B/2 L/2 XL/2 (paper), mini/2 T/2 (CPU)
    # Overrides of the preset; None keeps the preset's value.
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None  # total blocks, of the kinds block_pattern cycles through
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0: class-conditional (UCF101: 101), labels from the data; id num_classes is the null label
    class_dropout_prob: float = 0.1  # label -> null during training, for classifier-free guidance
    # Output 2 * in_channels: the prediction and the variance interpolation of Nichol & Dhariwal
    # (DDPM only). False is the default a run's YAML gets; the paper configs set it, as the
    # official recipe learns the variance.
    learn_sigma: bool = False
    # The official code adds fixed sin-cos position tables (the temporal one once, before the
    # first temporal block). True makes both tables parameters initialised to the same values;
    # False reproduces the official fixed buffers.
    learned_pos_embed: bool = True
    # The MLP's GELU: "exact" (erf) or "tanh", the approximation DiT, Latte and the official
    # FVDM code use. Their weights give their outputs only with "tanh"; the two forms differ by
    # at most ~5e-4 per activation, and on the CPU the tanh form is the slower (README).
    gelu: str = "exact"
    grad_checkpointing: bool = False
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): the network also sees an earlier
    # estimate of the clean frames (zeros when there is none), concatenated to x by channel.
    self_condition: bool = False
    # conv_head > 0: the final Linear emits conv_head channels per pixel and a 3x3 convolution
    # over each whole frame maps them to the output (U-ViT's extra conv): output pixels then see
    # their neighbours across patch borders, which a per-patch Linear cannot. 0: off (DiT).
    conv_head: int = 0
    # 3x3 convolutions in the conv head: layers - 1 residual ones at conv_head channels (SiLU,
    # conv, added back), then the one to the output.
    conv_head_layers: int = 1
    # Block kinds (BLOCK_KINDS letters), cycled over depth. "ST" is Latte.
    block_pattern: str = "ST"
    backend: str = "auto"  # operator set (BACKENDS): fused kernels, plain PyTorch, or fused where built
    # The data's geometry: frame height = width (latent or pixel, divisible by patch_size),
    # channels, and the length of the temporal position table (shorter clips use a prefix).
    input_size: int | None = field(default=None, metadata=_FROM_DATA)
    in_channels: int | None = field(default=None, metadata=_FROM_DATA)
    num_frames: int | None = field(default=None, metadata=_FROM_DATA)

    def resolved(self, **geometry: int) -> ModelConfig:
        """A copy with every architecture field an int: the size preset fills the overrides
        left at None, `geometry` (input_size, in_channels, num_frames) the data's fields, and
        DEFAULT_GEOMETRY what neither gives. ValueError for an unknown size or geometry key."""
        if self.size not in LATTE_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; choose one of {', '.join(LATTE_SIZES)}")
        unknown = set(geometry) - set(DEFAULT_GEOMETRY)
        if unknown:
            raise ValueError(f"unknown geometry field(s) {sorted(unknown)}; geometry is {sorted(DEFAULT_GEOMETRY)}")
        preset = dict(zip(_PRESET, LATTE_SIZES[self.size]))
        values = {k: v for k, v in preset.items() if getattr(self, k) is None}
        for k, default in DEFAULT_GEOMETRY.items():
            value = geometry.get(k, getattr(self, k))
            values[k] = default if value is None else value
        return replace(self, **values)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        """ValueError naming the first inconsistency of a resolved config."""
        if any(getattr(self, k) is None for k in (*_PRESET, *DEFAULT_GEOMETRY)):
            raise ValueError("the model config is not resolved (call resolved() first)")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.conv_head < 0:
            raise ValueError(f"conv_head must be >= 0 (0: off), got {self.conv_head}")
        if self.conv_head_layers < 1:
            raise ValueError(f"conv_head_layers must be >= 1, got {self.conv_head_layers}")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {', '.join(GELU_FORMS)}, got {self.gelu!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.block_pattern or set(self.block_pattern) - set(BLOCK_KINDS):
            raise ValueError(
                f"block_pattern must be a non-empty string of {'/'.join(BLOCK_KINDS)} "
                f"(spatial, temporal, joint), got {self.block_pattern!r}"
            )

    def block_kinds(self) -> list[str]:
        """The kind of each of the depth blocks: block_pattern repeated."""
        return [self.block_pattern[i % len(self.block_pattern)] for i in range(self.depth)]


def data_fields() -> frozenset[str]:
    """The fields the data set (never a run's config): input_size, in_channels, num_frames."""
    return frozenset(f.name for f in fields(ModelConfig) if f.metadata.get("from_data"))


def model_config(size: str, **fields_: object) -> ModelConfig:
    """A resolved ModelConfig for a preset with any field given, e.g.
    model_config("S/2", input_size=32, in_channels=4, depth=8)."""
    unknown = set(fields_) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
    return ModelConfig(size=size, **fields_).resolved()
