"""Official FVDM and Latte checkpoints in and out of fvdm runs (`python -m fvdm convert`).

The three layouts hold the same tensors under different names:

- fvdm: `blocks.{i}` in depth order, spatial at even i and temporal at odd i (block_pattern
  "ST"); class table `y_embedder.embedding.weight`; position tables (1, 1, N, D) and
  (1, F, 1, D), parameters when learned, else fixed buffers outside the state dict.
- official FVDM (`LatteVIDEO`): `blocks_spatial.{j}` and `blocks_temp.{j}` for fvdm's blocks
  2j and 2j + 1; class table `y_embedder.embedding_table.weight`; position tables
  `pos_embed` (1, N, D) and `temp_embed` (1, F, D), always in the state dict.
- Latte (`Latte`): the official names with fvdm's block order, `blocks.{i}`. Its timestep
  embedder has the same tensors; it is simply always given one t per clip.

Every other name (x_embedder.proj, t_embedder.mlp.{0,2}, attn.qkv / attn.proj, mlp.fc1 /
mlp.fc2, adaLN_modulation.1, final_layer.linear / final_layer.adaLN_modulation.1) is shared.
The official and Latte models compute what fvdm's computes with model.gelu "tanh", block
pattern "ST" and the fixed sin-cos tables (which fvdm's own tables equal to float32 rounding).

Import reads a `.pt` (torch.load with weights_only=True only: a file it refuses is refused,
never unpickled) or `.safetensors` holding `ema` and/or `model` state dicts or a bare state
dict (keys may carry DDP's `module.` or torch.compile's `_orig_mod.` prefix), infers the
architecture from the tensor shapes, and writes an fvdm run: config.yaml and a checkpoint
(model and EMA weights, a fresh optimizer state) that `sample`, `eval` and `train --resume`
take as they take a run of ours. Export writes a run's weights in the official (or Latte)
layout as a `.pt` of plain tensors: {"ema": ..., "model": ...}.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fvdm.config import Config, apply_overrides, config_path, from_dict, load_config
from fvdm.errors import UserError

LAYOUTS = ("official", "latte")
_PREFIXES = ("module.", "_orig_mod.")
_OFFICIAL_BLOCK = re.compile(r"blocks_(spatial|temp)\.(\d+)\.(.*)")
_LATTE_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")
_FVDM_CLASS_TABLE, _OTHER_CLASS_TABLE = "y_embedder.embedding.weight", "y_embedder.embedding_table.weight"
_TABLES = ("pos_embed", "temp_embed")
# fvdm's fixed sin-cos tables and the official ones (float64 numpy, then float32) agree to
# float32 rounding; a table further off than this was trained or is not sin-cos at all.
_TABLE_TOL = 1e-5


# ----------------------------------------------------------------------------- reading


def read_source(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts in an official / Latte / bare checkpoint file: {"ema": sd, "model": sd}
    with whichever it holds (a bare state dict counts as "model"), prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    else:
        obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    found = {k: obj[k] for k in ("ema", "model") if isinstance(obj.get(k), dict)}
    if not found and isinstance(obj.get("state_dict"), dict):
        found = {"model": obj["state_dict"]}
    if not found:
        found = {"model": obj}
    return {name: _clean_state(sd, f"{path}" + ("" if sd is obj else f" [{name}]")) for name, sd in found.items()}


def _torch_load(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a torch.save file (not a zip archive; legacy or damaged)")
    import argparse

    try:
        # DiT-style training scripts also store their argparse Namespace ("args"): a plain record
        # of attributes, allowed here; anything else outside weights_only's set is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: torch.load(weights_only=True) refuses it ({_refusal(e)}); fvdm never unpickles "
                        "arbitrary objects: re-save just the weights (a dict of tensors) where it was written") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path} is damaged or not a checkpoint ({_first_line(e)})") from None


def _refusal(e: Exception) -> str:
    """The informative line of torch's long weights_only message (the global it refused)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "Unsupported operand" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def _clean_state(sd: dict, where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: key {key!r} is not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key
        while name.startswith(_PREFIXES):
            name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
        if name in out:
            raise UserError(f"{where}: {key!r} and another key both name {name!r}")
        out[name] = value
    if not out:
        raise UserError(f"{where} holds no tensors")
    return out


def detect_layout(sd: dict[str, torch.Tensor], where: str) -> str:
    official = any(_OFFICIAL_BLOCK.match(k) for k in sd)
    latte = any(_LATTE_BLOCK.match(k) for k in sd)
    if official and latte:
        raise UserError(f"{where} mixes the official (blocks_spatial / blocks_temp) and Latte (blocks.N) block names")
    if not (official or latte):
        raise UserError(f"{where} has no transformer blocks (blocks_spatial.* / blocks_temp.* or blocks.*): "
                        "not an FVDM or Latte checkpoint")
    return "official" if official else "latte"


# ----------------------------------------------------------------------------- names


def to_fvdm_names(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Source names -> fvdm names, tables in fvdm's shapes. Unknown names pass through (they
    are reported as not part of the model)."""
    out = {}
    for key, value in sd.items():
        name = key
        m = _OFFICIAL_BLOCK.fullmatch(key) if layout == "official" else None
        if m:
            name = f"blocks.{2 * int(m[2]) + (m[1] == 'temp')}.{m[3]}"
        elif key == _OTHER_CLASS_TABLE:
            name = _FVDM_CLASS_TABLE
        elif key == "pos_embed" and value.dim() == 3:
            value = value[:, None]  # (1, N, D) -> (1, 1, N, D)
        elif key == "temp_embed" and value.dim() == 3:
            value = value[:, :, None]  # (1, F, D) -> (1, F, 1, D)
        out[name] = value
    return out


def from_fvdm_names(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """fvdm names (with both position tables present) -> the official or Latte layout."""
    out = {}
    for key, value in sd.items():
        name = key
        m = _LATTE_BLOCK.fullmatch(key)
        if m and layout == "official":
            i = int(m[1])
            name = f"blocks_{'temp' if i % 2 else 'spatial'}.{i // 2}.{m[2]}"
        elif key == _FVDM_CLASS_TABLE:
            name = _OTHER_CLASS_TABLE
        elif key == "pos_embed":
            value = value.reshape(1, -1, value.shape[-1])
        elif key == "temp_embed":
            value = value.reshape(1, value.shape[1], value.shape[-1])
        out[name] = value.detach().contiguous()
    return out


# ----------------------------------------------------------------------------- architecture


@dataclass
class Architecture:
    """What the tensors say about the model (None: not in the checkpoint)."""

    depth: int
    hidden_size: int
    patch_size: int
    in_channels: int
    learn_sigma: bool | None
    mlp_ratio: float | None
    input_size: int | None  # from pos_embed
    num_frames: int | None  # from temp_embed
    class_rows: int | None  # rows of the class table (classes + the null class)


def infer_architecture(sd: dict[str, torch.Tensor], where: str) -> Architecture:
    """From fvdm-named tensors."""
    w = sd.get("x_embedder.proj.weight")
    if w is None or w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise UserError(f"{where} has no patch embedding x_embedder.proj.weight of shape (D, C, p, p)")
    D, C, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    blocks = sorted({int(m[1]) for k in sd if (m := _LATTE_BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise UserError(f"{where}: the blocks are not numbered 0..N-1 (found {_short(blocks)})")
    learn_sigma = None
    lin = sd.get("final_layer.linear.weight")
    if lin is not None:
        per_pixel, rem = divmod(int(lin.shape[0]), p * p)
        if rem or per_pixel not in (C, 2 * C):
            raise UserError(f"{where}: the output layer gives {lin.shape[0]} values per patch, not {p}x{p}x{C} "
                            f"or {p}x{p}x{2 * C} for a {C}-channel input")
        learn_sigma = per_pixel == 2 * C
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = int(fc1.shape[0]) / D if fc1 is not None else None
    input_size = None
    pos = sd.get("pos_embed")
    if pos is not None:
        n = int(pos.shape[-2])
        grid = int(round(n ** 0.5))
        if grid * grid != n or pos.shape[-1] != D:
            raise UserError(f"{where}: pos_embed has shape {tuple(pos.shape)}, not (1, grid*grid, {D})")
        input_size = grid * p
    temp = sd.get("temp_embed")
    num_frames = int(temp.shape[1]) if temp is not None else None
    table = sd.get(_FVDM_CLASS_TABLE)
    class_rows = int(table.shape[0]) if table is not None else None
    return Architecture(len(blocks), D, p, C, learn_sigma, mlp_ratio, input_size, num_frames, class_rows)


def _preset(arch: Architecture, size: str | None, num_heads: int | None) -> dict[str, Any]:
    """model-section keys (size and its overrides) for the architecture."""
    from fvdm.models import LATTE_SIZES

    if size is not None:
        size = re.sub(r"^(LatteVIDEO|Latte)-", "", size)
        if size not in LATTE_SIZES:
            raise UserError(f"--size {size!r} is not a model size; choose one of {', '.join(LATTE_SIZES)}")
        depth, width, heads, patch = LATTE_SIZES[size]
        if (depth, width) != (arch.depth, arch.hidden_size):
            raise UserError(f"--size {size} has depth {depth} and width {width}, the checkpoint "
                            f"{arch.depth} and {arch.hidden_size}")
        names = [size]
    else:
        names = [n for n, (d, w, _, _) in LATTE_SIZES.items() if (d, w) == (arch.depth, arch.hidden_size)]
    keys: dict[str, Any] = {}
    if names:
        keys["size"] = names[0]
        heads, patch = LATTE_SIZES[names[0]][2:]
        if patch != arch.patch_size:
            keys["patch_size"] = arch.patch_size
        if num_heads is not None and num_heads != heads:
            keys["num_heads"] = num_heads
        return keys
    if num_heads is None:
        raise UserError(f"no model size has depth {arch.depth} and width {arch.hidden_size}, and the number of "
                        "attention heads is not in the tensors: pass --num-heads")
    return {"size": "S/2", "depth": arch.depth, "hidden_size": arch.hidden_size, "num_heads": num_heads,
            "patch_size": arch.patch_size}


# ----------------------------------------------------------------------------- import


@dataclass
class LoadReport:
    """How a source state dict went into the model (fvdm names)."""

    loaded: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)  # model tensors the source has not (or not in this shape)
    ignored: list[str] = field(default_factory=list)  # source tensors the model has no place for
    mismatched: dict[str, str] = field(default_factory=dict)  # name -> "source shape vs model shape"
    checked_tables: list[str] = field(default_factory=list)  # fixed tables found equal to the source's
    model_tensors: int = 0  # entries of the model's state dict

    @property
    def complete(self) -> bool:
        return not (self.left_at_init or self.ignored)

    def as_dict(self) -> dict[str, Any]:
        return {"model_tensors": self.model_tensors, "loaded": self.loaded, "left_at_init": self.left_at_init, "ignored": self.ignored,
                "shape_mismatch": self.mismatched, "fixed_tables_checked": self.checked_tables}


def fit_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The model's state dict with every source tensor (fvdm names) that fits copied in, and
    the report. Fixed position tables are not in the state dict: the source's must equal them."""
    own = model.state_dict()
    report = LoadReport(model_tensors=len(own))
    state = {k: v.detach().clone() for k, v in own.items()}
    for name in _TABLES:
        if name in own or name not in sd:
            continue
        fixed = getattr(model, name)
        src = sd[name]
        if src.shape != fixed.shape:
            report.ignored.append(name)
            report.mismatched[name] = f"{tuple(src.shape)} vs fixed {tuple(fixed.shape)}"
            continue
        diff = float((src.double() - fixed.double()).abs().max())
        if diff > _TABLE_TOL:
            raise UserError(f"{where}: {name} differs from the fixed sin-cos table by up to {diff:.2e} (trained?): "
                            "set model.learned_pos_embed=true to load it as a parameter")
        report.checked_tables.append(name)
    null_row_only = None
    for name, value in sd.items():
        if name in _TABLES and name not in own:
            continue
        if name not in own:
            report.ignored.append(name)
            continue
        target = own[name]
        if value.shape == target.shape:
            state[name] = value.detach().to(target.dtype).clone()
            report.loaded.append(name)
        elif name == _FVDM_CLASS_TABLE and value.shape[0] + 1 == target.shape[0] and value.shape[1:] == target.shape[1:]:
            state[name][:-1] = value.to(target.dtype)  # a table without the null class (dropout 0)
            null_row_only = name
            report.loaded.append(name)
        else:
            report.mismatched[name] = f"{tuple(value.shape)} vs {tuple(target.shape)}"
            report.ignored.append(name)
    report.left_at_init = [k for k in own if k not in report.loaded]
    if null_row_only:
        report.left_at_init.append(f"{null_row_only}[-1] (the null-class row)")
    return state, report


def _describe(report: LoadReport) -> str:
    parts = []
    if report.left_at_init:
        parts.append(f"{len(report.left_at_init)} model tensor(s) not in it ({_short(report.left_at_init)})")
    if report.mismatched:
        parts.append("shape mismatch " + _short([f"{k} {v}" for k, v in report.mismatched.items()]))
    extra = [k for k in report.ignored if k not in report.mismatched]
    if extra:
        parts.append(f"{len(extra)} tensor(s) the model has no place for ({_short(extra)})")
    return "; ".join(parts)


@dataclass
class Imported:
    run_dir: Path
    checkpoint: Path
    cfg: Config
    layout: str
    reports: dict[str, LoadReport]  # "model" / "ema" -> how it loaded


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    size: str | None = None,
    num_heads: int | None = None,
    num_classes: int | None = None,
    allow_partial: bool = False,
    step: int = 0,
) -> Imported:
    """Write an fvdm run at `out` from an official FVDM or Latte checkpoint `src`.

    config: a YAML / shipped config the run starts from (a paper config for the paper's data);
    its model section must describe the checkpoint's model. Without it, the model section
    (and data.num_frames, and the frame size and channels for a pixel-space model) come from
    the tensors. overrides: `section.key=value` on top. num_classes: when the class table has
    no null-class row (trained without label dropout), its row count; else rows - 1. Refuses
    (UserError, one line) a checkpoint that does not fill the model exactly unless
    allow_partial, which leaves the rest at the initial values train would draw and reports
    which tensors were loaded and which were not. step: the step the run resumes from."""
    from fvdm.pipeline.build import build_model, model_input_shape, vae_geometry
    from fvdm.train.checkpoint import list_checkpoints, save_checkpoint

    if layout not in ("auto",) + LAYOUTS:
        raise UserError(f"--from must be auto, official or latte, got {layout!r}")
    out = Path(out)
    if out.exists() and list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints: choose another --out")
    if step < 0:
        raise UserError(f"--step must be >= 0, got {step}")
    states = read_source(src)
    where = str(src)
    first = next(iter(states.values()))
    found = detect_layout(first, where)
    if layout != "auto" and layout != found:
        raise UserError(f"--from {layout}, but {where} has the {found} layout "
                        f"({'blocks_spatial / blocks_temp' if found == 'official' else 'blocks.N'} names)")
    layout = found
    named = {k: to_fvdm_names(sd, layout) for k, sd in states.items()}
    arch = infer_architecture(named[next(iter(named))], where)
    if arch.depth % 2:
        raise UserError(f"{where} has {arch.depth} blocks: spatial / temporal pairs need an even number")
    for name, sd in named.items():
        other = infer_architecture(sd, where)
        if other != arch:
            raise UserError(f"{where}: its model and ema weights describe different models")

    # The run's config: the given one, or one filled in from the tensors.
    given = {item.split("=", 1)[0].strip() for item in overrides}
    if config is not None:
        import yaml

        path = config_path(config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config {path}: {_first_line(e)}") from None
        cfg = from_dict(data if isinstance(data, dict) else {})
    else:
        cfg = from_dict({"name": out.name})
        for key, value in _preset(arch, size, num_heads).items():
            setattr(cfg.model, key, value)
        cfg.model.gelu = "tanh"
        if arch.learn_sigma is not None:
            cfg.model.learn_sigma = arch.learn_sigma
        if arch.mlp_ratio is not None:
            cfg.model.mlp_ratio = arch.mlp_ratio
        if arch.class_rows is not None:
            cfg.model.num_classes = num_classes if num_classes is not None else arch.class_rows - 1
        if arch.num_frames is not None:
            cfg.data.num_frames = arch.num_frames
        if arch.input_size is not None:
            cfg.data.size = arch.input_size
        if arch.in_channels in (1, 3):
            cfg.data.channels = arch.in_channels
        cfg.model.learned_pos_embed = _trained_tables(named[next(iter(named))], arch)
    apply_overrides(cfg, list(overrides))
    if config is None and cfg.data.vae and "data.size" not in given and arch.input_size is not None:
        factor, _ = vae_geometry(cfg.data.vae)
        cfg.data.size = arch.input_size * factor  # pixels that encode to the checkpoint's latents
    cfg.validate()
    _check_fits(cfg, arch, size, num_heads, num_classes, where, model_input_shape)

    torch.manual_seed(cfg.train.seed)  # the initial values a fresh training run of this config draws
    model = build_model(cfg, backend="reference")
    fitted, reports = {}, {}
    for name, sd in named.items():
        fitted[name], reports[name] = fit_state(model, sd, where)
        if not reports[name].complete and not allow_partial:
            raise UserError(f"{where} does not fill the model: {_describe(reports[name])}: pass --allow-partial to "
                            f"load the {len(reports[name].loaded)} tensors that fit and leave the rest at their "
                            "initial values")
    model_state = fitted.get("model", fitted.get("ema"))
    ema_state = fitted.get("ema", fitted.get("model"))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                            weight_decay=cfg.train.weight_decay, fused=True)  # as the trainer builds it
    provenance = {"source": str(Path(src).resolve()), "layout": layout, "allow_partial": allow_partial,
                  "weights": sorted(states), "reports": {k: r.as_dict() for k, r in reports.items()}}
    train_state = {"optimizer": opt.state_dict(), "step": step, "world_size": 1,
                   "data": {"seed": cfg.data.seed, "samples_seen": step * cfg.train.batch_size},
                   "converted_from": json.dumps(provenance)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "config.yaml", _yaml(cfg))
        _atomic_write(out / "convert.json", json.dumps(provenance, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the run directory {out}: {e.strerror or e}") from None
    ckpt = save_checkpoint(out, step, model_state, ema_state, train_state, config=cfg.to_dict(), keep=None)
    return Imported(out, ckpt, cfg, layout, reports)


def _trained_tables(sd: dict[str, torch.Tensor], arch: Architecture) -> bool:
    """Whether the checkpoint's position tables are other than the fixed sin-cos ones (then
    they become learned parameters); absent tables count as fixed."""
    from fvdm.models.latte import sincos_1d, sincos_2d

    for name in _TABLES:
        table = sd.get(name)
        if table is None:
            continue
        if name == "pos_embed":
            grid = int(round(table.shape[-2] ** 0.5))
            fixed = sincos_2d(arch.hidden_size, grid).view(1, 1, grid * grid, -1)
        else:
            fixed = sincos_1d(arch.hidden_size, torch.arange(table.shape[1], dtype=torch.float64)).view(1, -1, 1,
                                                                                                        arch.hidden_size)
        if table.shape != fixed.shape or float((table.double() - fixed.double()).abs().max()) > _TABLE_TOL:
            return True
    return False


def _check_fits(cfg: Config, arch: Architecture, size, num_heads, num_classes, where: str, model_input_shape) -> None:
    """The config's model must be the checkpoint's: one line naming every difference."""
    m = cfg.model
    try:
        r = m.resolved()
        depth, width, heads, patch = r.depth, r.hidden_size, r.num_heads, r.patch_size
    except ValueError:  # an unknown size: only its explicit overrides can be compared
        depth, width, heads, patch = m.depth, m.hidden_size, m.num_heads, m.patch_size
    have = {"depth": depth, "width": width, "patch": patch}
    want = {"depth": arch.depth, "width": arch.hidden_size, "patch": arch.patch_size}
    if arch.mlp_ratio is not None:
        have["mlp_ratio"], want["mlp_ratio"] = m.mlp_ratio, arch.mlp_ratio
    if arch.learn_sigma is not None:
        have["learn_sigma"], want["learn_sigma"] = m.learn_sigma, arch.learn_sigma
    if arch.class_rows is not None:
        have["num_classes"] = m.num_classes
        want["num_classes"] = num_classes if num_classes is not None else arch.class_rows - 1
    if num_heads is not None:
        have["heads"], want["heads"] = heads, num_heads
    frames, channels, input_size = model_input_shape(cfg)
    have["channels"], want["channels"] = channels, arch.in_channels
    if arch.input_size is not None:
        have["frame size"], want["frame size"] = input_size, arch.input_size
    if arch.num_frames is not None:
        have["frames"], want["frames"] = frames, arch.num_frames
    diff = [f"{k} {have[k]} (checkpoint {want[k]})" for k in want if have[k] != want[k]]
    if diff:
        hint = ""
        if "channels" in [k for k in want if have[k] != want[k]] and arch.in_channels not in (1, 3):
            hint = f": a {arch.in_channels}-channel model works on VAE latents, give data.vae=<AutoencoderKL folder>"
        raise UserError(f"{where} does not match the config: {', '.join(diff)}{hint}")
    if m.block_pattern != "ST":
        raise UserError(f"model.block_pattern must be ST (spatial, temporal, ...) for these weights, got "
                        f"{m.block_pattern!r}")
    if m.gelu != "tanh":
        raise UserError("model.gelu is exact, but these weights were trained with the tanh GELU: "
                        "set model.gelu=tanh to get the official outputs")


# ----------------------------------------------------------------------------- export


@dataclass
class Exported:
    path: Path
    layout: str
    checkpoint: Path
    weights: list[str]  # "ema", "model"


def export_checkpoint(run: str | Path, out: str | Path, *, layout: str = "official",
                      checkpoint: str | Path | None = None, allow_exact_gelu: bool = False) -> Exported:
    """Write the weights of an fvdm run (its latest good checkpoint, or `checkpoint`) as a `.pt`
    in the official FVDM (or Latte) layout: {"ema": ..., "model": ...} of plain tensors, with
    both position tables, loadable by the official scripts (which read "ema")."""
    from fvdm.pipeline.build import build_model
    from fvdm.errors import CheckpointError
    from fvdm.train.checkpoint import find_latest, load_checkpoint

    if layout not in LAYOUTS:
        raise UserError(f"--to must be official or latte, got {layout!r}")
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run or checkpoint directory")
    target = Path(checkpoint) if checkpoint is not None else run
    if target.is_dir() and not (target / "meta.json").exists():
        latest = find_latest(target)
        if latest is None:
            raise CheckpointError(f"{target} has no complete checkpoint")
        target = latest
    ckpt = load_checkpoint(target, map_location="cpu")
    if (run / "config.yaml").is_file():
        cfg = load_config(run / "config.yaml")
    elif ckpt.meta.get("config"):
        cfg = from_dict(ckpt.meta["config"]).validate()
    else:
        raise UserError(f"no config.yaml in {run} and none stored in {ckpt.path}")
    m = cfg.model
    if m.block_pattern != "ST" or m.self_condition or m.conv_head:
        raise UserError("only the plain Latte model (block_pattern ST, no self_condition, no conv_head) has an "
                        f"official layout; this run has block_pattern {m.block_pattern!r}, self_condition "
                        f"{m.self_condition}, conv_head {m.conv_head}")
    if m.gelu != "tanh" and not allow_exact_gelu:
        raise UserError("this run's model uses the exact GELU and the official model the tanh one, so its outputs "
                        "would differ (up to ~1e-3 per activation): pass --allow-exact-gelu to export anyway")
    model = build_model(cfg, backend="reference")
    if model.config.depth % 2:
        raise UserError(f"the model has {model.config.depth} blocks; the official layout needs spatial / temporal pairs")
    result: dict[str, dict[str, torch.Tensor]] = {}
    for name, weights in (("ema", ckpt.ema), ("model", ckpt.model)):
        if weights is None:
            continue
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model of its config: "
                                  f"{str(e).splitlines()[0]}") from None
        sd = dict(model.state_dict())
        for table in _TABLES:  # fixed tables are buffers outside the state dict; the official has them in it
            sd.setdefault(table, getattr(model, table))
        result[name] = from_fvdm_names(sd, layout)
    if "ema" not in result:  # the official scripts load "ema"
        result["ema"] = result["model"]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, tmp)
        _fsync(tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {getattr(e, 'strerror', None) or _first_line(e)}") from None
    return Exported(out, layout, ckpt.path, sorted(result))


# ----------------------------------------------------------------------------- helpers


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _short(names, n: int = 4) -> str:
    names = [str(x) for x in names]
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
