"""Latte-style video DiT with per-frame timesteps (FVDM's vectorized timestep variable).

Read top to bottom: embedders -> attention -> block -> final layer -> model ->
sin-cos helpers -> latte() (a named size). The configuration, with the size presets, is
fvdm.models.config.ModelConfig.

Activations live in one layout, x (B, F, N, D): batch, frames, tokens per frame, width.
Spatial blocks attend over N by viewing it as (B*F, N, D); temporal blocks attend over F with
the fused op reading q, k, v in place from the (B, F, N, 3, H, Dh) qkv projection. Nothing is
rearranged between blocks. Every block is conditioned per frame: t (B, F) -> c (B, F, D) ->
six (B, F, D) adaLN-zero vectors, applied through the operator set's adaln_modulate and
gated_residual (the set is chosen once, when the model is built, and held by every block), so
a frame's timestep reaches only that frame's modulation.

Blocks follow config.block_pattern, cycled over the depth: the default "ST" alternates
spatial, temporal, spatial, ... (block i is temporal when i is odd), so a Latte depth of 28 is
14 spatial + 14 temporal blocks; depth 1 is a per-frame image DiT. "J" is a joint space-time
block (every token of a clip attends to every other, SDPA over F*N tokens): affordable only
for small clips, where it lets a token find the same object in another frame wherever it moved.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from fvdm.models.config import ModelConfig, model_config
from fvdm.ops import get_backend


# ----------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """Each frame on its own: (B, F, C, H, W) -> (B, F, N, D) with N = (H / p) * (W / p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Fr = x.shape[:2]
        x = self.proj(x.flatten(0, 1))  # (B*F, D, h, w)
        return x.flatten(2).transpose(1, 2).reshape(B, Fr, -1, x.shape[1])  # (B, F, N, D)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, any shape (...) -> (..., dim),
    [cos | sin] halves, frequencies max_period^(-i / half). Computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Per-frame timestep embedding: t (B, F) -> sinusoid (B, F, 256) -> MLP -> (B, F, D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_size)  # float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # model weights may be bf16


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Id num_classes is the null label; in training each label
    becomes null with probability dropout_prob (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding(y)


# ----------------------------------------------------------------------------- attention


class _Attention(nn.Module):
    """qkv and output projections shared by the spatial and temporal attention layers."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention, with its math backend for bf16/fp16 on the CPU when a
    backward will follow: at these sizes (16-128 tokens, Dh 32) the flash kernel's backward is
    5-10x slower than the math one there, while its forward is the faster, so sampling keeps it."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class SpatialAttention(_Attention):
    """Self-attention among the N tokens of each frame: (B, F, N, D) seen as (B*F, N, D)."""

    def forward(self, x: torch.Tensor, frame_local: bool = False) -> torch.Tensor:
        B, Fr, N, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).view(B * Fr, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (3, B*F, H, N, Dh)
        out = sdpa(qkv[0], qkv[1], qkv[2])  # (B*F, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, Fr, N, D))


class JointAttention(SpatialAttention):
    """Self-attention among all F*N tokens of a clip: spatial attention over the clip seen as
    one frame, (B, F, N, D) as (B, 1, F*N, D)."""

    def forward(self, x: torch.Tensor, frame_local: bool = False) -> torch.Tensor:
        if frame_local:  # within each frame only: spatial attention
            return super().forward(x)
        B, Fr, N, D = x.shape
        return super().forward(x.reshape(B, 1, Fr * N, D)).view(B, Fr, N, D)


class TemporalAttention(_Attention):
    """Self-attention along F for every (b, token, head). The fused op reads q, k, v in place
    from the (B, F, N, 3, H, Dh) projection and writes (B, F, N, H, Dh): no transposes; its
    backward writes the projection's gradient in that layout too. ops: the model's operator set."""

    def __init__(self, dim: int, num_heads: int, ops: SimpleNamespace):
        super().__init__(dim, num_heads)
        self.ops = ops

    def forward(self, x: torch.Tensor, frame_local: bool = False) -> torch.Tensor:
        B, Fr, N, D = x.shape
        H = self.num_heads
        if frame_local:  # each frame attends only to itself: the output is its own value
            return self.proj(F.linear(x, self.qkv.weight[2 * D:], self.qkv.bias[2 * D:]))
        out = self.ops.temporal_attention_qkv(self.qkv(x).view(B, Fr, N, 3, H, D // H))  # (B, F, N, H, Dh)
        return self.proj(out.view(B, Fr, N, D))


# ----------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. gelu "exact" (erf) or "tanh" (DiT / Latte / official FVDM): on the
    CPU the tanh form is ~4x slower."""

    def __init__(self, dim: int, hidden: int, gelu: str = "exact"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


ATTENTION = {"S": SpatialAttention, "T": TemporalAttention, "J": JointAttention}  # by ModelConfig.BLOCK_KINDS letter


class LatteBlock(nn.Module):
    """adaLN-zero transformer block, conditioned per frame by c (B, F, D); kind is a
    BLOCK_KINDS letter (fvdm.models.config): spatial, temporal or joint space-time attention. ops: the operator set
    (fvdm.ops.get_backend) its modulation, residuals and temporal attention run on."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind: str = "S", gelu: str = "exact",
                 ops: SimpleNamespace | None = None):
        super().__init__()
        self.kind = kind
        self.ops = ops if ops is not None else get_backend("auto")
        self.attn = TemporalAttention(dim, num_heads, self.ops) if kind == "T" else ATTENTION[kind](dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, frame_local: bool = False) -> torch.Tensor:
        ops = self.ops
        # Six (B, F, D) vectors per frame; cast to the residual stream's dtype because the
        # fused ops take one dtype (under autocast the Linear gives bf16, x stays float32).
        mods = self.adaLN_modulation(c).to(x.dtype).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = self.attn(ops.adaln_modulate(x, shift1, scale1), frame_local)
        x = ops.gated_residual(x, h.to(x.dtype), gate1)
        h = self.mlp(ops.adaln_modulate(x, shift2, scale2))
        return ops.gated_residual(x, h.to(x.dtype), gate2)


class FinalLayer(nn.Module):
    """Per-frame adaLN, then a Linear to the p*p*C values of each patch (C = C_out, or the
    conv head's channels)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, ops: SimpleNamespace | None = None):
        super().__init__()
        self.ops = ops if ops is not None else get_backend("auto")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=-1)
        return self.linear(self.ops.adaln_modulate(x, shift, scale))  # (B, F, N, p*p*C)


class ConvHead(nn.Module):
    """(B, F, C_hidden, H, W) -> [h + 3x3 conv(SiLU(h))] * (layers - 1) -> SiLU -> 3x3 conv
    -> (B, F, C_out, H, W), per frame."""

    def __init__(self, hidden: int, out_channels: int, layers: int = 1):
        super().__init__()
        self.hidden_convs = nn.ModuleList(nn.Conv2d(hidden, hidden, kernel_size=3, padding=1) for _ in range(layers - 1))
        self.conv = nn.Conv2d(hidden, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(0, 1)
        for conv in self.hidden_convs:
            h = h + conv(F.silu(h))
        return self.conv(F.silu(h)).unflatten(0, x.shape[:2])


# ----------------------------------------------------------------------------- model


class Latte(nn.Module):
    """Video DiT with per-frame timesteps.

    forward(x (B, F, C, H, W), t (B, F) or (B,), y (B,) or None) -> (B, F, C_out, H, W).
    config: a resolved ModelConfig (ModelConfig.resolved, model_config). Its backend ("fused" |
    "reference" | "auto") is resolved once here to the operator set (fvdm.ops.get_backend) that
    the blocks hold; `model.ops` is what the diffusion loss and samplers are given with the
    model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        D = config.hidden_size
        self.ops = get_backend(config.backend)

        embed_channels = config.in_channels * (2 if config.self_condition else 1)
        self.x_embedder = PatchEmbed(config.patch_size, embed_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, D, config.class_dropout_prob) if config.num_classes > 0 else None
        )
        grid = config.input_size // config.patch_size
        spatial = sincos_2d(D, grid).view(1, 1, grid * grid, D)
        temporal = sincos_1d(D, torch.arange(config.num_frames, dtype=torch.float64)).view(1, -1, 1, D)
        if config.learned_pos_embed:
            self.pos_embed = nn.Parameter(spatial)
            self.temp_embed = nn.Parameter(temporal)
        else:
            self.register_buffer("pos_embed", spatial, persistent=False)
            self.register_buffer("temp_embed", temporal, persistent=False)

        kinds = config.block_kinds()
        self.blocks = nn.ModuleList(
            LatteBlock(D, config.num_heads, config.mlp_ratio, kind, config.gelu, self.ops) for kind in kinds
        )
        # The temporal table goes in once, before the first block that mixes frames.
        self.temp_embed_at = next((i for i, k in enumerate(kinds) if k != "S"), config.depth)
        head = config.conv_head or config.out_channels
        self.final_layer = FinalLayer(D, config.patch_size, head, self.ops)
        self.conv_head = ConvHead(head, config.out_channels, config.conv_head_layers) if config.conv_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier Linears, N(0, 0.02) embedding MLPs, and adaLN-zero: the adaLN Linears and the
        output layer (the conv head's conv when there is one, else the final Linear) start at
        zero, so every block is the identity and the output is zero."""

        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over a flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        output = self.conv_head.conv if self.conv_head is not None else self.final_layer.linear
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1], output]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def conditioning(
        self, t: torch.Tensor, y: torch.Tensor | None = None, num_frames: int | None = None
    ) -> torch.Tensor:
        """Per-frame conditioning c (B, F, D): timestep embedding of t (B, F) (or (B,) repeated
        over num_frames) plus the class embedding of y (B,), the same for every frame."""
        if t.dim() == 1:
            if num_frames is None:
                raise ValueError("t has shape (B,): pass num_frames to broadcast it to (B, F)")
            t = t[:, None].expand(-1, num_frames)
        elif t.dim() != 2:
            raise ValueError(f"t must have shape (B, F) or (B,), got {tuple(t.shape)}")
        c = self.t_embedder(t)  # (B, F, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("y (class labels, shape (B,)) is required: the model has num_classes > 0")
            if y.shape != (t.shape[0],):
                raise ValueError(f"y must have shape ({t.shape[0]},), got {tuple(y.shape)}")
            c = c + self.y_embedder(y)[:, None, :]  # same label for every frame
        elif y is not None:
            raise ValueError("y was given but the model is unconditional (num_classes = 0)")
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                x_self: torch.Tensor | None = None, *, frame_local: bool = False) -> torch.Tensor:
        """x (B, F, C, H, W) noisy frames, t (B, F) or (B,) model times, y (B,) labels,
        x_self: the earlier clean estimate (shape of x) for a self-conditioning model (None:
        zeros). frame_local: every frame sees only itself (temporal attention maps become the
        identity, joint blocks attend within the frame): the weak model of spatiotemporal skip
        guidance (diffusion.guidance). Returns (B, F, C_out, H, W)."""
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.in_channels or x.shape[3:] != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"x must have shape (B, F, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), "
                f"got {tuple(x.shape)}"
            )
        B, Fr = x.shape[:2]
        if Fr > cfg.num_frames:
            raise ValueError(f"x has {Fr} frames but the model was built for at most num_frames={cfg.num_frames}")
        if t.shape not in ((B,), (B, Fr)):
            raise ValueError(f"t must have shape ({B}, {Fr}) or ({B},), got {tuple(t.shape)}")

        if cfg.self_condition:
            if x_self is None:
                x_self = torch.zeros_like(x)
            elif x_self.shape != x.shape:
                raise ValueError(f"x_self must have the shape of x {tuple(x.shape)}, got {tuple(x_self.shape)}")
            x = torch.cat([x, x_self.to(x.dtype)], dim=2)
        elif x_self is not None:
            raise ValueError("x_self was given but the model has self_condition=False")
        c = self.conditioning(t, y, Fr)  # (B, F, D)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, F, N, D)
        for i, block in enumerate(self.blocks):
            if i == self.temp_embed_at:
                h = h + self.temp_embed[:, :Fr].to(h.dtype)
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, frame_local, use_reentrant=False)
            else:
                h = block(h, c, frame_local)
        h = self.unpatchify(self.final_layer(h, c))  # (B, F, C, H, W)
        return h if self.conv_head is None else self.conv_head(h)  # (B, F, C_out, H, W)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, F, N, p*p*C) -> (B, F, C, H, W), patch values ordered (p_row, p_col, C)."""
        B, Fr, N, PPC = h.shape
        p = self.config.patch_size
        C = PPC // (p * p)
        g = int(math.isqrt(N))
        h = h.reshape(B, Fr, g, g, p, p, C)
        return h.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, Fr, C, g * p, g * p)


# ----------------------------------------------------------------------------- sin-cos helpers


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] with frequencies 10000^(-2i / dim), in float64
    then float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid*grid, dim): half the channels encode the column, half the row (row-major tokens)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


# ----------------------------------------------------------------------------- presets


def latte(name: str, **fields) -> Latte:
    """Build a named Latte size with any ModelConfig field given:
    latte("T/2", input_size=8, in_channels=3, num_frames=4, backend="reference")."""
    return Latte(model_config(name, **fields))
