"""Official FVDM and Latte checkpoints in and out (`fvdm convert`).

The official model is restated here as a plain function of its state dict (official_forward,
written from reading `LatteVIDEO` in github.com/Yaofang-Liu/FVDM models/latte_video.py; none
of its code), so that "fvdm's output equals the official model's" is checked against the
official computation, not against fvdm's own. Its key layout for one size is written down as
data (OFFICIAL_S2_UCF)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fvdm.convert import fit_state, from_fvdm_names, import_checkpoint, infer_architecture, to_fvdm_names
from fvdm.errors import UserError
from fvdm.models import latte
from fvdm.pipeline.runs import load_run
from helpers import cli

# ----------------------------------------------------------------------------- the official layout as data

# LatteVIDEO-S/2 as the official UCF101 configs build it: 32x32x4 latents, 16 frames, learned
# variance, 101 classes with label dropout (so 102 rows), depth 12 = 6 spatial + 6 temporal.
_BLOCK = {  # every blocks_spatial.j / blocks_temp.j
    "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
    "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
    "adaLN_modulation.1.weight": (2304, 384), "adaLN_modulation.1.bias": (2304,),
}
OFFICIAL_S2_UCF = {
    "pos_embed": (1, 256, 384), "temp_embed": (1, 16, 384),
    "x_embedder.proj.weight": (384, 4, 2, 2), "x_embedder.proj.bias": (384,),
    "t_embedder.mlp.0.weight": (384, 256), "t_embedder.mlp.0.bias": (384,),
    "t_embedder.mlp.2.weight": (384, 384), "t_embedder.mlp.2.bias": (384,),
    "y_embedder.embedding_table.weight": (102, 384),
    **{f"blocks_{kind}.{j}.{name}": shape for kind in ("spatial", "temp") for j in range(6)
       for name, shape in _BLOCK.items()},
    "final_layer.linear.weight": (32, 384), "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (768, 384), "final_layer.adaLN_modulation.1.bias": (768,),
}
assert len(OFFICIAL_S2_UCF) == 133  # 132 without the class table, as the issue counts them


# ----------------------------------------------------------------------------- the official forward, restated


def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], 1)


def official_tables(dim: int, grid: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's tables as LatteVIDEO fills them: 2-D from a meshgrid with the column coordinate
    first (first half of the channels), the row second; 1-D over frame indices."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.cat([_sincos(dim // 2, cols), _sincos(dim // 2, rows)], 1)
    return pos.float()[None], _sincos(dim, torch.arange(frames)).float()[None]


def official_forward(sd, x, t, y, *, heads: int, dtype=torch.float32):
    """LatteVIDEO.forward(x (B, F, C, H, W), t (B, F), y (B,) or None) in eval mode, 'math'
    attention, from its state dict sd (official names)."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    x, B, Fr = x.to(dtype), x.shape[0], x.shape[1]
    w = sd["x_embedder.proj.weight"]
    D, p = w.shape[0], w.shape[-1]
    h = F.conv2d(x.flatten(0, 1), w, sd["x_embedder.proj.bias"], stride=p)  # (B*F, D, g, g)
    g = h.shape[-1]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B*F, N, D)
    N = h.shape[1]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arg = t.float()[..., None] * freqs
    emb = torch.cat([arg.cos(), arg.sin()], -1).to(dtype)  # (B, F, 256)
    c = F.linear(F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                 sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # (B, F, D)
    if y is not None:
        c = c + sd["y_embedder.embedding_table.weight"][y][:, None]
    c_spatial = c.reshape(B * Fr, 1, D)  # one vector per (clip, frame), broadcast over tokens
    c_temp = c[:, None].expand(B, N, Fr, D).reshape(B * N, Fr, D)  # per (clip, token), per frame

    def block(prefix, h, c):
        mods = F.linear(F.silu(c), sd[f"{prefix}.adaLN_modulation.1.weight"], sd[f"{prefix}.adaLN_modulation.1.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, -1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale1) + shift1
        L = a.shape[1]
        qkv = F.linear(a, sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"])
        q, k, v = qkv.reshape(-1, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)
        a = F.linear((att @ v).transpose(1, 2).reshape(-1, L, D), sd[f"{prefix}.attn.proj.weight"],
                     sd[f"{prefix}.attn.proj.bias"])
        h = h + gate1 * a
        m = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale2) + shift2
        m = F.gelu(F.linear(m, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]), approximate="tanh")
        return h + gate2 * F.linear(m, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])

    pairs = len({k.split(".")[1] for k in sd if k.startswith("blocks_spatial.")})
    for j in range(pairs):
        h = block(f"blocks_spatial.{j}", h, c_spatial)
        h = h.reshape(B, Fr, N, D).transpose(1, 2).reshape(B * N, Fr, D)  # (b f) n d -> (b n) f d
        if j == 0:
            h = h + sd["temp_embed"]
        h = block(f"blocks_temp.{j}", h, c_temp)
        h = h.reshape(B, N, Fr, D).transpose(1, 2).reshape(B * Fr, N, D)
    shift, scale = F.linear(F.silu(c_spatial), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    h = F.linear(F.layer_norm(h, (D,), eps=1e-6) * (1 + scale) + shift, sd["final_layer.linear.weight"],
                 sd["final_layer.linear.bias"])  # (B*F, N, p*p*C)
    C = h.shape[-1] // (p * p)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B * Fr, g, g, p, p, C)).reshape(B * Fr, C, g * p, g * p)
    return h.reshape(B, Fr, C, g * p, g * p)


# A small official-shaped model: pixels 3x8x8 (so no VAE is needed), 4 frames, depth 4.
SMALL = dict(D=64, heads=4, depth=4, C=3, size=8, p=2, frames=4, classes=5)


def official_state(seed: int = 0, classes: int | None = SMALL["classes"], C: int = SMALL["C"]) -> dict[str, torch.Tensor]:
    """A random official-layout state dict of the SMALL model, every tensor non-zero (adaLN and
    output layers too, unlike a fresh init) so that every path reaches the output."""
    D, p, N = SMALL["D"], SMALL["p"], (SMALL["size"] // SMALL["p"]) ** 2
    g = torch.Generator().manual_seed(seed)
    shapes = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "final_layer.linear.weight": (p * p * 2 * C, D), "final_layer.linear.bias": (p * p * 2 * C,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes + 1, D)
    block = {"attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D),
             "attn.proj.bias": (D,), "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
             "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,), "adaLN_modulation.1.weight": (6 * D, D),
             "adaLN_modulation.1.bias": (6 * D,)}
    for kind in ("spatial", "temp"):
        for j in range(SMALL["depth"] // 2):
            shapes.update({f"blocks_{kind}.{j}.{k}": s for k, s in block.items()})
    sd = {k: torch.randn(s, generator=g) / math.sqrt(s[-1] if len(s) > 1 else 4) for k, s in shapes.items()}
    sd["pos_embed"], sd["temp_embed"] = official_tables(D, int(math.isqrt(N)), SMALL["frames"])
    return sd


def inputs(seed: int = 1, B: int = 2, classes: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, SMALL["frames"], SMALL["C"], SMALL["size"], SMALL["size"], generator=g)
    t = torch.randint(0, 1000, (B, SMALL["frames"]), generator=g)  # per-frame times, all different
    y = torch.tensor([1, 3])[:B] if classes else None
    return x, t, y


LABELLED = ["data.kind=frames", "data.root=/data"]  # what a class-conditional run needs besides its tensors


def save_official(path: Path, sd, key: str | None = "ema", prefix: str = "") -> Path:
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({key: sd} if key else sd, path)
    return path


def one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, (code, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def assert_official_match(ours: torch.Tensor, sd, x, t, y, heads: int):
    """fvdm's float32 output against the official computation: its error from the float64
    official result may be at most twice the float32 official result's, plus 1e-6 (the rule
    of tests/helpers.py): equal to float32 rounding."""
    ref32 = official_forward(sd, x, t, y, heads=heads)
    ref64 = official_forward(sd, x, t, y, heads=heads, dtype=torch.float64)
    err, err_ref = (ours.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)
    return err


# ----------------------------------------------------------------------------- tests


def test_imported_official_weights_give_the_official_output(tmp_path, capsys):
    sd = official_state()
    src = save_official(tmp_path / "0300000.pt", sd, prefix="module.")
    # class-conditional: the labelled data it was trained on cannot be read from the tensors
    code, _, err = cli(capsys, "convert", str(src), "--out", str(tmp_path / "run"))
    one_line_error(code, err, "num_classes", "labelled data")
    code, out, err = cli(capsys, "convert", str(src), "--out", str(tmp_path / "run"), *LABELLED)
    assert code == 0, err
    assert "loaded" in out and "left at initial" not in out
    run = load_run(tmp_path / "run", device="cpu")
    cfg = run.cfg.model
    assert (cfg.gelu, cfg.learned_pos_embed, cfg.learn_sigma, cfg.num_classes) == ("tanh", False, True, 5)
    assert (run.model.config.depth, run.model.config.hidden_size, run.model.config.num_heads) == (4, 64, 4)
    x, t, y = inputs()
    with torch.no_grad():
        ours = run.model(x, t, y)
        err = assert_official_match(ours, sd, x, t, y, heads=SMALL["heads"])
        # the same weights with the exact GELU are measurably further off: the check can fail
        exact = latte("T/2", gelu="exact", **{k: getattr(run.model.config, k) for k in (
            "depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_frames", "num_classes",
            "learn_sigma", "learned_pos_embed")}).eval()
        exact.load_state_dict(run.model.state_dict())
        off = (exact(x, t, y).double() - official_forward(sd, x, t, y, heads=4, dtype=torch.float64)).abs().max()
    assert off > 100 * max(err, 1e-7)
    # the fixed tables fvdm builds are the official ones to float32 rounding
    torch.testing.assert_close(run.model.pos_embed.view(1, -1, 64), sd["pos_embed"], rtol=0, atol=1e-6)
    torch.testing.assert_close(run.model.temp_embed.view(1, -1, 64), sd["temp_embed"], rtol=0, atol=1e-6)


def test_trained_position_tables_become_learned_parameters(tmp_path):
    sd = official_state(classes=None)
    sd["temp_embed"] = sd["temp_embed"] + 0.1  # trained away from sin-cos
    done = import_checkpoint(save_official(tmp_path / "a.pt", sd, key=None), tmp_path / "run")
    assert done.cfg.model.learned_pos_embed and done.cfg.model.num_classes == 0
    run = load_run(tmp_path / "run", device="cpu")
    x, t, _ = inputs(classes=False)
    with torch.no_grad():
        assert_official_match(run.model(x, t), sd, x, t, None, heads=SMALL["heads"])
    # a config that fixes the tables cannot take them
    with pytest.raises(UserError, match="learned_pos_embed=true"):
        import_checkpoint(tmp_path / "a.pt", tmp_path / "run2", overrides=["model.learned_pos_embed=false"])


def test_official_layout_of_one_size_both_ways():
    model = latte("S/2", input_size=32, in_channels=4, num_frames=16, num_classes=101, learn_sigma=True,
                  gelu="tanh", learned_pos_embed=False)
    sd = dict(model.state_dict())
    sd.update(pos_embed=model.pos_embed, temp_embed=model.temp_embed)
    exported = from_fvdm_names(sd, "official")
    assert {k: tuple(v.shape) for k, v in exported.items()} == OFFICIAL_S2_UCF
    # and the layout written down above goes in whole, the architecture read from its shapes
    src = {k: torch.zeros(s) for k, s in OFFICIAL_S2_UCF.items()}
    src["pos_embed"], src["temp_embed"] = exported["pos_embed"], exported["temp_embed"]
    named = to_fvdm_names(src, "official")
    arch = infer_architecture(named, "src")
    assert (arch.depth, arch.hidden_size, arch.patch_size, arch.in_channels, arch.learn_sigma, arch.input_size,
            arch.num_frames, arch.class_rows, arch.mlp_ratio) == (12, 384, 2, 4, True, 32, 16, 102, 4.0)
    _, report = fit_state(model, named, "src")
    assert report.complete and len(report.loaded) == report.model_tensors == 131
    assert report.checked_tables == ["pos_embed", "temp_embed"]


def test_export_then_import_gives_identical_outputs(tmp_path, capsys):
    src = import_checkpoint(save_official(tmp_path / "a.pt", official_state(seed=3)), tmp_path / "run",
                            overrides=LABELLED)
    code, out, err = cli(capsys, "convert", str(src.run_dir), "--to", "official", "--out", str(tmp_path / "back.pt"))
    assert code == 0, err
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == ["ema", "model"]
    assert all(k.startswith(("blocks_spatial.", "blocks_temp.")) for k in back["ema"] if "blocks" in k)
    again = import_checkpoint(tmp_path / "back.pt", tmp_path / "again", overrides=LABELLED)
    a, b = load_run(src.run_dir, device="cpu"), load_run(again.run_dir, device="cpu")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    x, t, y = inputs(seed=4)
    with torch.no_grad():
        assert torch.equal(a.model(x, t, y), b.model(x, t, y))
    # the exported tensors are the official model's: its forward on them is ours
    with torch.no_grad():
        assert_official_match(a.model(x, t, y), back["ema"], x, t, y, heads=SMALL["heads"])
    # an exact-GELU run is not exported unless asked for
    run = tmp_path / "exact"
    import_checkpoint(tmp_path / "a.pt", run, overrides=LABELLED)
    cfg_file = run / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("gelu: tanh", "gelu: exact"))
    code, _, err = cli(capsys, "convert", str(run), "--to", "official", "--out", str(tmp_path / "x.pt"))
    one_line_error(code, err, "exact GELU", "--allow-exact-gelu")
    assert not (tmp_path / "x.pt").exists()


def test_latte_layout_and_partial_load(tmp_path, capsys):
    """Latte names (blocks.N in fvdm's order), no class table, one tensor the model has no use
    for: refused whole; loaded with --allow-partial, which says exactly what it did."""
    official = official_state(seed=5, classes=None)
    lat = {}
    for k, v in official.items():
        if k.startswith("blocks_"):
            kind, j, rest = k.split(".", 2)
            k = f"blocks.{2 * int(j) + (kind == 'blocks_temp')}.{rest}"
        lat[k] = v
    lat["text_embedding_projection.1.weight"] = torch.zeros(3, 3)
    src = tmp_path / "latte.pt"
    torch.save({"model": lat, "ema": lat}, src)
    cfg_yaml = tmp_path / "c.yaml"
    cfg_yaml.write_text("model: {size: T/2, hidden_size: 64, depth: 4, num_heads: 4, learn_sigma: true, gelu: tanh, "
                        "learned_pos_embed: false, num_classes: 5}\n"
                        "data: {kind: frames, root: /data, size: 8, num_frames: 4}\n")
    code, _, err = cli(capsys, "convert", str(src), "--out", str(tmp_path / "run"), "--config", str(cfg_yaml))
    one_line_error(code, err, "y_embedder.embedding.weight", "text_embedding_projection", "--allow-partial")
    assert not (tmp_path / "run").exists()
    code, out, err = cli(capsys, "convert", str(src), "--from", "latte", "--out", str(tmp_path / "run"),
                         "--config", str(cfg_yaml), "--allow-partial")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "convert.json").read_text())["reports"]["ema"]
    assert report["left_at_init"] == ["y_embedder.embedding.weight"]
    assert report["ignored"] == ["text_embedding_projection.1.weight"]
    assert len(report["loaded"]) == report["model_tensors"] - 1 == 50  # 2 + 4 + 1 + 4 x 10 + 4 in the model
    assert "loaded 50 of the model's 51 tensors" in out and "y_embedder.embedding.weight" in out
    run = load_run(tmp_path / "run", device="cpu")
    torch.manual_seed(run.cfg.train.seed)
    fresh = latte("T/2", hidden_size=64, depth=4, num_heads=4, learn_sigma=True, gelu="tanh", learned_pos_embed=False,
                  num_classes=5, input_size=8, in_channels=3, num_frames=4)
    state = run.model.state_dict()
    assert torch.equal(state["y_embedder.embedding.weight"], fresh.state_dict()["y_embedder.embedding.weight"])
    assert torch.equal(state["blocks.3.mlp.fc2.weight"], official["blocks_temp.1.mlp.fc2.weight"])
    # --from official on Latte names is a mismatch
    code, _, err = cli(capsys, "convert", str(src), "--from", "official", "--out", str(tmp_path / "r2"),
                       "--allow-partial")
    one_line_error(code, err, "--from official", "latte layout")


def test_converted_run_resumes_training(tmp_path, capsys):
    sd = official_state(seed=6, classes=None)
    src = save_official(tmp_path / "a.pt", sd)
    over = ["data.kind=sprites", "data.num_videos=8", "train.batch_size=2", "train.steps=3", "train.ckpt_every=3",
            "train.log_every=1", "train.sample_every=0", "train.sample_videos=1", "train.sample_steps=2"]
    code, _, err = cli(capsys, "convert", str(src), "--out", str(tmp_path / "run"), "--step", "2", *over)
    assert code == 0, err
    code, out, err = cli(capsys, "train", "--config", str(tmp_path / "run" / "config.yaml"), "--out",
                         str(tmp_path / "run"), "--resume", "--no-progress")
    assert code == 0, err
    assert "resumed from" in out + err and "step 3" in out
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(tmp_path / "run"), "-n", "1", "--steps", "2",
                       "--no-progress", "--out", str(tmp_path / "samples"))
    assert code == 0, err


class Trap:
    """Unpickling this would run os.system: weights_only must refuse it, never call it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch TRAPPED",))


def test_malformed_and_mismatched_checkpoints_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = official_state(seed=7)
    run = str(tmp_path / "run")

    def refuse(path, *words, extra=()):
        code, _, err = cli(capsys, "convert", str(path), "--out", run, *LABELLED, *extra)
        one_line_error(code, err, *words)
        assert not Path(run).exists()

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    refuse(tmp_path / "junk.pt", "not a torch.save file")
    refuse(tmp_path / "missing.pt", "no such checkpoint")
    good = save_official(tmp_path / "good.pt", sd)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refuse(tmp_path / "cut.pt", "cut.pt")
    torch.save({"ema": sd, "hook": Trap()}, tmp_path / "trap.pt")
    refuse(tmp_path / "trap.pt", "weights_only=True", "never unpickles")
    assert not (tmp_path / "TRAPPED").exists()
    torch.save({"ema": {**sd, "step": 3}}, tmp_path / "int.pt")
    refuse(tmp_path / "int.pt", "'step'", "not a tensor")
    torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(8, 3, 2, 2)}}, tmp_path / "noblocks.pt")
    refuse(tmp_path / "noblocks.pt", "no transformer blocks")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    refuse(tmp_path / "tensor.pt", "not a dict")
    bad = dict(sd, **{"final_layer.linear.weight": torch.zeros(20, 64)})
    refuse(save_official(tmp_path / "out.pt", bad), "output layer")
    # mismatches with what the user said
    refuse(good, "--size XL/2", "depth 28", extra=["--size", "XL/2"])
    refuse(good, "does not match the config", "depth", extra=["--config", "demo_cpu"])
    refuse(good, "frames 8 (checkpoint 4)", extra=["data.num_frames=8"])
    refuse(good, "gelu", extra=["model.gelu=exact"])
    latent = save_official(tmp_path / "latent.pt", official_state(seed=8, C=4))
    refuse(latent, "channels 3 (checkpoint 4)", "data.vae")
    # a depth / width no size has: the number of heads is asked for
    small = {k: v for k, v in sd.items() if not k.startswith(("blocks_spatial.1", "blocks_temp.1"))}
    refuse(save_official(tmp_path / "d2.pt", small), "--num-heads")
    code, _, err = cli(capsys, "convert", str(tmp_path / "d2.pt"), "--out", run, "--num-heads", "4", *LABELLED)
    assert code == 0, err
    # options of the other direction
    code, _, err = cli(capsys, "convert", str(good), "--out", str(tmp_path / "r3"), "--ckpt", str(tmp_path))
    one_line_error(code, err, "--ckpt", "export")
    code, _, err = cli(capsys, "convert", run, "--to", "official", "--out", str(tmp_path / "o.pt"), "--allow-partial")
    one_line_error(code, err, "--allow-partial", "import")
    # an existing run is not overwritten
    code, _, err = cli(capsys, "convert", str(good), "--out", run, *LABELLED)
    one_line_error(code, err, "already holds checkpoints")
