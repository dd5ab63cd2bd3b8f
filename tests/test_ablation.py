"""`fvdm bench ablation` end to end on a tiny budget: three arms that differ only in PTSS p,
each scored on every task (the scalar arm both by replacement and by holding frames), a table
and a JSON with every number; running it again reuses the finished arms."""

from __future__ import annotations

import json

import yaml

from fvdm.eval.i3d import KNOWN_SHA256
from test_cli import TINY, cli

SMALL = TINY + ["data.size=16", "model.patch_size=4"]


def test_ablation_end_to_end(capsys, tmp_path):
    out_dir, out = tmp_path / "arms", tmp_path / "ablation.json"
    args = ["bench", "ablation", *SMALL, "--out-dir", str(out_dir), "--out", str(out), "--videos", "1",
            "--steps", "2", "--no-progress"]
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert set(doc["columns"]) == {"ptss (hold)", "scalar (replace)", "scalar (hold)", "independent (hold)"}
    assert {a: v["ptss_p"] for a, v in doc["arms"].items()} == {"ptss": 0.2, "scalar": 0.0, "independent": 1.0}
    for col in doc["columns"].values():
        assert set(col) == {"unconditional", "i2v", "interpolate", "extend", "long"}
        assert col["unconditional"]["model"]["i3d_fvd"] >= 0 and col["unconditional"]["data"]["i3d_fvd"] >= 0
    assert doc["i3d"]["sha256"] == KNOWN_SHA256 and "i3d_fvd" in stdout
    # the arms differ in PTSS p and nothing else
    cfgs = {a: yaml.safe_load((out_dir / a / "config.yaml").read_text()) for a in doc["arms"]}
    for c in cfgs.values():
        c["diffusion"].pop("ptss_p")
    assert cfgs["ptss"] == cfgs["scalar"] == cfgs["independent"]
    assert "scalar (replace)" in stdout and "interpolate" in stdout
    # a second run trains nothing new: the checkpoints are untouched
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.safetensors")}
    code, _, err = cli(capsys, *args, "--no-i3d-fvd")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.safetensors")} == before


def test_ablation_needs_sprites(capsys, tmp_path):
    code, _, err = cli(capsys, "bench", "ablation", "data.kind=videos", f"data.root={tmp_path}",
                       "--out-dir", str(tmp_path / "a"))
    assert code == 2 and "sprites" in err and len(err.strip().splitlines()) == 1
