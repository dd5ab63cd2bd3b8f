"""Config loading: YAML + overrides, typed, unknown keys and bad values rejected by name."""

import pytest
import yaml

from fvdm.config import Config, load_config, save_config, shipped_configs
from fvdm.errors import UserError


def test_shipped_configs_load_and_mirror_the_paper():
    assert {"demo_cpu", "ffs", "sky", "ucf101", "taichi"} <= set(shipped_configs())
    for name in ("ffs", "sky", "ucf101", "taichi"):
        cfg = load_config(name, ["data.root=/data"])
        assert cfg.data.num_frames == 16 and cfg.data.size == 256 and cfg.data.frame_stride == 3
        assert cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999 and cfg.diffusion.ptss_p == 0.2
        assert cfg.model.learn_sigma and cfg.diffusion.objective == "eps"
    assert load_config("ucf101", ["data.root=/d"]).model.num_classes == 101
    assert load_config("sky", ["data.root=/d"]).model.size == "XL/2"


def test_overrides_are_typed():
    cfg = load_config("demo_cpu", ["train.steps=7", "train.lr=3e-4", "train.grad_clip=null",
                                   "train.betas=[0.8, 0.95]", "model.size=T/2", "train.ema_warmup=true"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-4 and cfg.train.grad_clip is None and cfg.train.betas == (0.8, 0.95)
    assert cfg.model.size == "T/2" and cfg.train.ema_warmup is True


@pytest.mark.parametrize("override, words", [
    ("train.stpes=3", ["unknown config key", "train.stpes", "steps"]),
    ("trian.steps=3", ["unknown config section", "trian"]),
    ("train.steps=many", ["train.steps", "integer"]),
    ("train.steps=0", ["train.steps", "[1, 1000000000]"]),
    ("diffusion.ptss_p=1.5", ["diffusion.ptss_p", "[0, 1]"]),
    ("diffusion.objective=flow", ["flow"]),
    ("diffusion.clean_prefix_p=1.0", ["diffusion.clean_prefix_p", "[0, 1)"]),
    ("data.kind=videos", ["data.root"]),
    ("train.precision=fp8", ["train.precision", "fp32"]),
    ("steps", ["section.key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config("demo_cpu", [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  lr_warmup: 3\n")
    with pytest.raises(UserError, match="lr_warmup"):
        load_config(p)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(p)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("demo_cpu", ["train.steps=11", "data.sprites={max_sprites: 1}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["steps"] == 11
    assert isinstance(Config().to_dict()["train"]["betas"], list)


def test_the_model_section_is_the_models_own_config_less_the_data_geometry():
    from fvdm.pipeline.build import build_model
    from fvdm.models import ModelConfig

    cfg = load_config("demo_cpu")
    assert type(cfg.model) is ModelConfig
    assert not {"input_size", "in_channels", "num_frames"} & set(cfg.to_dict()["model"])
    for key in ("input_size", "in_channels", "num_frames"):
        with pytest.raises(UserError, match=f"model.{key} is not set in a config: the model takes it from the data"):
            load_config("demo_cpu", [f"model.{key}=8"])
    model = build_model(load_config("demo_cpu", ["model.size=T/2", "model.depth=2", "model.hidden_size=32",
                                                 "model.num_heads=2"]))
    got = model.config
    assert (got.depth, got.hidden_size, got.num_heads, got.patch_size) == (2, 32, 2, 4)  # patch from demo_cpu
    assert (got.input_size, got.in_channels, got.num_frames) == (16, 3, 8)  # from the data section
    assert ModelConfig().learn_sigma is False and got.learn_sigma is False  # one default, the run config's


def test_data_num_workers_is_retired_old_configs_still_load():
    # configs saved by earlier versions carry data.num_workers: 0; nothing ever read it
    cfg = load_config("demo_cpu", ["data.num_workers=0"])
    assert "num_workers" not in cfg.to_dict()["data"]
    with pytest.raises(UserError, match=r"data.num_workers is no longer a setting \(clips are made in the training "
                                        r"process.*remove it from the config"):
        load_config("demo_cpu", ["data.num_workers=4"])
