"""FVD: the Fréchet distance against closed forms and scipy, streaming statistics, the
reference's clip sampling, and the whole pipeline (folders, checkpoint, CLI) driven by small
randomly initialised TorchScript networks with the I3D / Inception call interfaces."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fvdm.io import pixels
from fvdm.errors import UserError
from fvdm.eval.frechet import FeatureStats, frechet_distance, frechet_from_stats
from fvdm.eval.fvd import FolderClips, evaluate, load_i3d, load_inception
from test_cli import cli

# torch >= 2.10 deprecates TorchScript; the I3D of the FVD protocol is a TorchScript file
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


# ----------------------------------------------------------------------------- Fréchet distance


def random_spd(rng, d: int, cond: float = 10.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def rotated(diag: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (q * diag) @ q.T


def test_equal_covariances_give_the_squared_mean_distance():
    rng = np.random.default_rng(0)
    s = random_spd(rng, 12) * 3.0
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    d = frechet_distance(mu1, s, mu2, s)
    assert d.value == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-10)
    assert abs(d.trace_term) < 1e-10


@pytest.mark.parametrize("d, rank_a, rank_b", [(7, 7, 7), (7, 3, 3), (40, 5, 40)])
def test_commuting_covariances_match_the_closed_form(d, rank_a, rank_b):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2, also
    when they are rank-deficient (zeros in a or b: after rotation, rounding noise of ~1e-16 in
    the null space, whose square root would cost 1e-8 of accuracy if it were kept)."""
    rng = np.random.default_rng(d + rank_a)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    a[rank_a:], b[rank_b:] = 0.0, 0.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)).value == pytest.approx(want, rel=1e-12)
    assert frechet_distance(mu1, rotated(a, q), mu2, rotated(b, q)).value == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_matches_scipy_sqrtm_on_random_spd(d):
    from scipy import linalg

    rng = np.random.default_rng(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=100.0) * 2.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    root = linalg.sqrtm(s1 @ s2)
    want = float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got.value == pytest.approx(want, rel=1e-9)
    assert got.trace_sqrt == pytest.approx(float(np.real(np.trace(root))), rel=1e-10)
    ref = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert ref.value == pytest.approx(want, rel=1e-12) and ref.notes == ()


def test_rank_deficient_sample_covariances_give_a_finite_nonnegative_distance():
    """Fewer samples than dimensions (the reference's negative / 1e14 FVDs)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 40)) * 5 + 3, rng.normal(size=(5, 40))
    a, b = FeatureStats().update(x), FeatureStats().update(y)
    for method in ("eigh", "sqrtm"):
        d = frechet_from_stats(a, b, method=method)
        (m1, s1), (m2, s2) = a.mean_cov(), b.mean_cov()
        lower = np.sum((m1 - m2) ** 2) + (np.sqrt(np.trace(s1)) - np.sqrt(np.trace(s2))) ** 2
        upper = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
        assert np.isfinite(d.value) and lower * (1 - 1e-9) <= d.value <= upper
        same = frechet_from_stats(a, a, method=method)
        assert 0.0 <= same.value < 1e-9 * np.trace(s1)
    # identical rank-deficient sets: the eigen-method is exact to rounding
    assert frechet_from_stats(a, a).value < 1e-12 * np.trace(a.mean_cov()[1])


def test_symmetric_and_zero_for_identical_sets():
    rng = np.random.default_rng(4)
    a = FeatureStats().update(rng.normal(size=(50, 10)))
    b = FeatureStats().update(rng.normal(size=(60, 10)) @ rng.normal(size=(10, 10)) + 1)
    assert frechet_from_stats(a, b).value == pytest.approx(frechet_from_stats(b, a).value, rel=1e-11)
    d = frechet_from_stats(a, a)
    assert d.value == 0.0 or d.value < 1e-12
    assert frechet_from_stats(a, b).value > 1.0


def test_a_negative_rounding_result_is_clamped_with_a_reason():
    s = np.diag([1e6, 1.0, 1e-3])
    d = frechet_distance(np.zeros(3), s, np.zeros(3), s)
    assert d.value == 0.0
    assert all("rounding" in n for n in d.notes)


def test_bad_statistics_raise_naming_the_argument():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.diag([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.ones((3, 2)), np.zeros(3), eye)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(np.zeros(3), eye, np.full(3, np.nan), eye)


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(61, 8)) @ rng.normal(size=(8, 8)) + 4.0
    stats = FeatureStats()
    for lo, hi in [(0, 1), (1, 8), (8, 50), (50, 61)]:
        stats.update(torch.from_numpy(x[lo:hi]).float() if lo == 1 else x[lo:hi])
    mean, cov = stats.mean_cov()
    x[1:8] = x[1:8].astype(np.float32)  # the float32 batch, as it was added
    assert stats.count == 61
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)  # 1/N
    # merging two partial statistics gives the statistics of the union
    merged = FeatureStats().update(x[:30]).merge(FeatureStats().update(x[30:]))
    np.testing.assert_allclose(merged.mean_cov()[1], cov, rtol=1e-10, atol=1e-12)


def test_covariance_is_one_over_n_and_survives_a_large_offset():
    assert FeatureStats().update(np.array([[0.0], [2.0]])).mean_cov()[1][0, 0] == 1.0
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1000, 3)) + 1e8
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    exact = np.cov(x - x.mean(0), rowvar=False, bias=True)
    np.testing.assert_allclose(stats.mean_cov()[1], exact, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- tiny detectors


class TinyI3D(torch.nn.Module):
    """The I3D TorchScript's interface: uint8 (B, 3, T, H, W), rescale/resize inside, features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 videos shaped (B, 3, T, H, W)")
        if not (rescale and resize and return_features):
            raise RuntimeError("call as detector(videos, rescale=True, resize=True, return_features=True)")
        v = x.float() / 127.5 - 1.0
        v = F.interpolate(v, size=[x.shape[2], 16, 16], mode="trilinear", align_corners=False)
        h = torch.relu(self.conv(v))
        return torch.cat([h.mean(dim=[2, 3, 4]), v.mean(dim=[2, 3, 4])], dim=1)  # 9 features


class TinyInception(torch.nn.Module):
    """StyleGAN2-ADA's Inception interface: uint8 (N, 3, H, W), detector(images, return_features=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 images shaped (N, 3, H, W)")
        if not return_features:
            raise RuntimeError("call as detector(images, return_features=True)")
        v = F.interpolate(x.float() / 127.5 - 1.0, size=[16, 16], mode="bilinear", align_corners=False)
        return torch.cat([torch.relu(self.conv(v)).mean(dim=[2, 3]), v.mean(dim=[2, 3])], dim=1)


class NoKwargs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=[2, 3, 4])


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    paths = {}
    for name, net in (("i3d", TinyI3D()), ("inception", TinyInception()), ("nokwargs", NoKwargs())):
        paths[name] = root / f"{name}.pt"
        torch.jit.script(net.eval()).save(str(paths[name]))
    paths["corrupt"] = root / "corrupt.pt"
    paths["corrupt"].write_bytes(b"not a torchscript archive" * 10)
    return paths


# ----------------------------------------------------------------------------- tiny video folders


def clip_pixels(rng: np.random.Generator, frames: int, size: int = 16, dark: bool = False) -> np.ndarray:
    """uint8 (frames, size, size, 3): a coloured square moving over a coloured background
    (dark: a quarter of the brightness, another distribution)."""
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    x0, y0, vx, vy = *rng.integers(0, size - 6, 2), *rng.integers(-2, 3, 2)
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        out[f] = bg
        x, y = (x0 + vx * f) % (size - 5), (y0 + vy * f) % (size - 5)
        out[f, y:y + 5, x:x + 5] = fg
    return out // 4 if dark else out


def write_videos(root: Path, count: int, frames: int, seed: int = 0, dark: bool = False,
                 kind: str = "mp4") -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        video = clip_pixels(rng, frames, dark=dark)
        if kind == "mp4":
            pixels.save_video(root / f"video_{i:03d}.mp4", video, fps=4, scale=1)
        else:
            (root / f"video_{i:03d}").mkdir()
            for f, frame in enumerate(video):
                Image.fromarray(frame).save(root / f"video_{i:03d}" / f"{f:06d}.png")
    return root


# ----------------------------------------------------------------------------- clip sampling


def grey_frame_folders(root: Path, lengths: list[int]) -> Path:
    """Frame folders of greyscale PNGs whose pixel value is the frame number."""
    for v, n in enumerate(lengths):
        (root / f"v{v}").mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((4, 6), k, np.uint8), mode="L").save(root / f"v{v}" / f"{k:06d}.png")
    return root


def test_real_clips_follow_the_reference_sampling(tmp_path):
    """T frames every s-th from a start uniform over the valid starts; videos shorter than T*s
    frames skipped (even one of exactly (T-1)*s+1 frames, as the reference's discard rule)."""
    T, s = 4, 2
    lengths = [8, 7, 12, 30, 9, 3, 20]  # 7 and 3 are < T*s = 8
    root = grey_frame_folders(tmp_path / "real", lengths)
    clips = FolderClips(root, role="real", option="--real", num_clips=5, num_frames=T, stride=s, seed=3)
    assert (clips.found, clips.skipped, clips.min_frames) == (7, 2, 8)
    got = [x for b in clips.batches(batch_size=2) for x in b]
    assert len(got) == 5 and clips.resolution == (4, 6)
    for (path, idx), x in zip(clips.clips, got):
        n = lengths[int(path.name[1:])]
        assert n >= T * s and idx == list(range(idx[0], idx[0] + T * s - 1, s)) and idx[-1] < n
        assert x.dtype == torch.uint8 and x.shape == (3, T, 4, 6)  # grey repeated to 3 channels
        assert torch.equal(x[:, :, 0, 0], torch.tensor(idx, dtype=torch.uint8).expand(3, T))
    again = FolderClips(root, role="real", option="--real", num_clips=5, num_frames=T, stride=s, seed=3)
    assert again.clips == clips.clips  # seeded
    # over seeds, the start of a 12-frame video covers exactly the reference's randint(0, 12 - 8 + 2 - 1)
    starts = set()
    for seed in range(150):
        c = FolderClips(root, role="real", option="--real", num_clips=5, num_frames=T, stride=s, seed=seed)
        starts |= {idx[0] for path, idx in c.clips if path.name == "v2"}
    assert starts == set(range(0, 12 - (T - 1) * s))


def test_fake_clips_are_the_first_frames(tmp_path):
    root = grey_frame_folders(tmp_path / "fake", [5, 9, 4])
    clips = FolderClips(root, role="fake", option="--fake", num_clips=3, num_frames=4, stride=1, random_start=False)
    assert all(idx == [0, 1, 2, 3] for _, idx in clips.clips)
    with pytest.raises(UserError, match="shorter than 5 frames"):
        FolderClips(root, role="fake", option="--fake", num_clips=2, num_frames=5, random_start=False)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "real": write_videos(root / "real", 8, 6, seed=0),
        "real_frames": write_videos(root / "real_frames", 8, 6, seed=0, kind="png"),
        "other": write_videos(root / "other", 8, 6, seed=1),  # same distribution, other videos
        "shifted": write_videos(root / "shifted", 8, 6, seed=1, dark=True),
    }


def fvd(nets, real: Path, fake: Path, inception: bool = False, **kw) -> dict:
    opts = dict(num_clips=8, num_frames=4, seed=0)
    r = FolderClips(real, role="real", option="--real", stride=1, **opts, **kw)
    f = FolderClips(fake, role="fake", option="--fake", stride=1, random_start=False, **opts)
    inc = load_inception(nets["inception"]) if inception else None
    return evaluate(r, f, load_i3d(nets["i3d"]), inc, batch_size=3, seed=0)


def test_identical_sets_give_zero_and_a_shifted_set_a_larger_fvd(nets, folders):
    same = fvd(nets, folders["real"], folders["real"], random_start=False, inception=True)
    assert 0.0 <= same["fvd"] < 1e-9 and 0.0 <= same["fid_clip_frames"] < 1e-9
    other = fvd(nets, folders["real"], folders["other"], inception=True)
    shifted = fvd(nets, folders["real"], folders["shifted"], inception=True)
    assert 0.0 < other["fvd"] < shifted["fvd"] / 2
    assert 0.0 < other["fid_clip_frames"] < shifted["fid_clip_frames"] / 2
    # 8 clips, 9 features: rank-deficient covariances, still a sane number
    assert np.isfinite(shifted["fvd"]) and shifted["protocol"]["detector"]["feature_dim"] == 9


def test_video_files_and_frame_folders_give_the_same_clips(nets, folders):
    """The same pixels read from mp4 (lossy) and PNG differ only by compression."""
    a = fvd(nets, folders["real"], folders["shifted"])
    b = fvd(nets, folders["real_frames"], folders["shifted"])
    assert a["real"]["kind"] == "videos" and b["real"]["kind"] == "frame folders"
    assert b["fvd"] == pytest.approx(a["fvd"], rel=0.2)


def test_frames_of_different_sizes_in_one_set_are_an_error(nets, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(0)
    pixels.save_video(root / "a.mp4", clip_pixels(rng, 4), fps=4, scale=1)
    pixels.save_video(root / "b.mp4", clip_pixels(rng, 4, size=24), fps=4, scale=1)
    clips = FolderClips(root, role="real", option="--real", num_clips=2, num_frames=4)
    with pytest.raises(UserError, match="one frame size"):
        list(clips.batches(batch_size=2))


# ----------------------------------------------------------------------------- CLI


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, (code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def test_cli_end_to_end_writes_the_protocol_fingerprint(capsys, nets, folders, tmp_path):
    out = tmp_path / "res" / "fvd.json"
    code, stdout, err = cli(capsys, "eval", "fvd", "--real", str(folders["real"]), "--fake", str(folders["shifted"]),
                            "--i3d", str(nets["i3d"]), "--inception", str(nets["inception"]), "--num-clips", "8",
                            "--frames", "4", "--subsample", "1", "--seed", "5", "--batch-size", "3",
                            "--workers", "2", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert "fvd8_4f" in stdout and "written to" in stdout
    p = result["protocol"]
    assert result["metric"] == p["name"] == "fvd8_4f" and result["fvd"] > 0
    fingerprint = (p["num_clips"], p["frames"], p["subsample_factor"], p["fake_subsample_factor"], p["seed"])
    assert fingerprint == (8, 4, 1, 1, 5)
    assert p["detector"]["sha256"] == hashlib.sha256(nets["i3d"].read_bytes()).hexdigest()
    assert p["detector"]["kwargs"] == {"rescale": True, "resize": True, "return_features": True}
    assert p["resolution"] == {"real": [16, 16], "fake": [16, 16]}
    assert result["fid"]["detector"]["sha256"] == hashlib.sha256(nets["inception"].read_bytes()).hexdigest()
    assert result["fid"]["frames_per_set"] == 32
    assert result["fvd_reference_sqrtm"] is None or np.isfinite(result["fvd_reference_sqrtm"])


def test_cli_generates_from_a_checkpoint(capsys, nets, tmp_path):
    from fvdm.config import load_config
    from fvdm.train.trainer import train

    run = tmp_path / "run"
    tiny = ["model.size=T/2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2",
            "data.size=8", "data.num_frames=4", "data.frame_stride=2", "data.num_videos=8", "train.batch_size=2",
            "train.steps=1", "train.ckpt_every=1", "train.log_every=1", "train.sample_steps=2",
            "train.sample_videos=1", "sample.steps=2", "train.precision=fp32"]
    train(load_config("demo_cpu", tiny), run, progress=False)
    real = write_videos(tmp_path / "real", 3, 8)
    code, stdout, err = cli(capsys, "eval", "fvd", "--real", str(real), "--ckpt", str(run), "--i3d",
                            str(nets["i3d"]), "--num-clips", "3", "--frames", "4", "--batch-size", "2",
                            "--device", "cpu", "--no-progress")
    assert code == 0, err
    (out,) = (run / "eval").glob("fvd3_4f_step*.json")
    result = json.loads(out.read_text())
    assert result["fake"]["kind"] == "generated" and result["fake"]["resolution"] == [8, 8]
    assert result["protocol"]["subsample_factor"] == 2  # the run's frame stride
    assert np.isfinite(result["fvd"]) and result["fvd"] >= 0
    code, _, err = cli(capsys, "eval", "fvd", "--real", str(real), "--ckpt", str(run), "--i3d", str(nets["i3d"]),
                       "--num-clips", "3", "--frames", "5", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "generates 4 frames", "--frames")


def test_cli_bad_inputs_give_one_line_errors(capsys, nets, folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["eval", "fvd", "--num-clips", "8", "--frames", "4", "--no-progress", "--out", str(tmp_path / "x.json")]
    real, fake = ["--real", str(folders["real"])], ["--fake", str(folders["shifted"])]
    cases = [
        ([*real, *fake, "--i3d", str(tmp_path / "missing.pt")], ["--i3d", "no such file", "never downloads"]),
        ([*real, *fake, "--i3d", str(nets["corrupt"])], ["--i3d", "not a TorchScript file"]),
        ([*real, *fake, "--i3d", str(nets["i3d"]), "--inception", str(nets["corrupt"])], ["--inception"]),
        ([*real, *fake, "--i3d", str(nets["nokwargs"])], ["--i3d", "failed", "I3D"]),
        (["--real", str(empty), *fake, "--i3d", str(nets["i3d"])], ["--real", "no videos"]),
        (["--real", str(tmp_path / "nope"), *fake, "--i3d", str(nets["i3d"])], ["--real", "not a folder"]),
        ([*real, *fake, "--i3d", str(nets["i3d"]), "--subsample", "2"], ["--real", "0 usable videos", "--num-clips"]),
        ([*real, *fake, "--i3d", str(nets["i3d"]), "--num-clips", "9"], ["9", "--num-clips"]),
        ([*real, "--i3d", str(nets["i3d"])], ["--fake", "--ckpt"]),
        ([*real, *fake, "--ckpt", str(tmp_path), "--i3d", str(nets["i3d"])], ["exactly one", "--fake", "--ckpt"]),
    ]
    for args, words in cases:
        code, _, err = cli(capsys, *base, *args)
        assert_one_line_error(code, err, *words)
    assert not (tmp_path / "x.json").exists()


def test_allow_fewer_real_uses_every_real_video_once(capsys, nets, folders, tmp_path):
    """--allow-fewer-real: the reference's behaviour for small datasets (FaceForensics), with
    the real count recorded; without it the same call is an error (see the bad-input test)."""
    fake = write_videos(tmp_path / "fake10", 10, 6, seed=2)
    out = tmp_path / "fvd.json"
    code, _, err = cli(capsys, "eval", "fvd", "--real", str(folders["real"]), "--fake", str(fake), "--i3d",
                       str(nets["i3d"]), "--num-clips", "10", "--frames", "4", "--allow-fewer-real", "--device", "cpu",
                       "--no-progress", "--out", str(out))
    assert code == 0, err
    p = json.loads(out.read_text())["protocol"]
    assert (p["num_clips"], p["num_real_clips"]) == (10, 8)
