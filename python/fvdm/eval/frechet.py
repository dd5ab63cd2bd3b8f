"""Fréchet distance between Gaussian fits of feature sets: the arithmetic behind FVD and FID.

Protocol matched (StyleGAN-V `metrics/metric_utils.py` and `frechet_video_distance.py`, as the
FVDM reference code `tools/metrics/` uses them):

* statistics in float64: the mean and the covariance with 1/N (not 1/(N - 1));
* d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

What is done differently, and why:

* **Accumulation.** The reference sums x and x x^T over all items and forms E[x x^T] - mu mu^T
  at the end, which cancels digits when the mean is large next to the spread. `FeatureStats`
  keeps, per batch, the batch mean and the scatter about it and merges batches exactly (Chan,
  Golub and LeVeque's pairwise update). The result is the same 1/N covariance, at least as
  accurate, still streaming: 2048 clips are never held in memory, and two partial statistics
  (e.g. from two processes) merge into the statistics of the union.
* **Matrix square root.** The reference takes scipy.linalg.sqrtm of the non-symmetric S_1 S_2
  with no regularisation: near-singular covariances (few samples, many features, long-video
  sets) then give complex, negative or 1e14 results, which the reference records as FVD. Here
  tr (S_1 S_2)^(1/2) is computed as the nuclear norm (sum of singular values) of
  S_1^(1/2) S_2^(1/2), the square roots taken by symmetric eigen-decomposition with eigenvalues
  below the numerical rank threshold (D * eps * largest) set to 0. That equals the reference's
  trace whenever the reference is well defined (S_1 S_2 is similar to the PSD matrix
  S_1^(1/2) S_2 S_1^(1/2), whose square-root trace is that nuclear norm), it is real by
  construction, and it is accurate to ~eps of the largest eigenvalue even when both
  covariances are rank-deficient (fewer samples than feature dimensions).
  `method="sqrtm"` runs the reference's formula instead, retrying with a growing eps * I added
  to both covariances when sqrtm's answer is not finite or has a large imaginary part, and
  falling back to the eigen-method if that still fails or the distance comes out negative
  beyond rounding; every retry and fallback is noted in the result.
* **Never negative.** Mathematically d^2 >= ||mu_1 - mu_2||^2 + (sqrt(tr S_1) - sqrt(tr S_2))^2 >= 0.
  A tiny negative result is float64 rounding (identical statistics) and is clamped to 0, with
  a note saying so; anything beyond rounding raises (it would be a bug, not a distance).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps)
# tolerance, relative to the distance's scale (tr S_1 + tr S_2 + ||mu_1 - mu_2||^2), below which a
# negative result is rounding and becomes 0
ROUNDING = 1e-9
# sqrtm method: largest |imaginary part| of sqrt(S_1 S_2)'s diagonal, relative to its largest
# |real| diagonal entry, taken as rounding (the reference keeps the real part unconditionally)
IMAG_TOLERANCE = 1e-3
# sqrtm method: offsets eps * I tried in turn, relative to the mean eigenvalue tr(S) / D
SQRTM_OFFSETS = (1e-10, 1e-8, 1e-6)


# ----------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and 1/N covariance of D-dimensional feature vectors, in float64.

    update(x) with x of shape (B, D) (numpy or torch, any float dtype) adds a batch; merge(other)
    adds another FeatureStats. mean_cov() gives (mean (D,), cov (D, D)) with cov = scatter / N,
    as the reference's get_mean_cov, whatever the batch sizes were."""

    def __init__(self, dim: int | None = None) -> None:
        self.count = 0
        self.dim = dim
        self._mean: np.ndarray | None = None  # (D,) float64
        self._scatter: np.ndarray | None = None  # (D, D) float64: sum of (x - mean)(x - mean)^T

    def update(self, x: np.ndarray | torch.Tensor) -> FeatureStats:
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be shaped (batch, dim), got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, earlier ones had {self.dim}")
        if x.shape[0] == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError(f"features contain {int((~np.isfinite(x)).sum())} NaN/inf values")
        mean = x.mean(axis=0)
        centred = x - mean
        return self._merge(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the items of `other` (statistics of the union, as if updated with its batches)."""
        if other.count == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim}-d features into {self.dim}-d ones")
        return self._merge(other.count, other._mean, other._scatter)

    def _merge(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> FeatureStats:
        if self.count == 0:
            self.count, self.dim = n, mean.shape[0]
            self._mean, self._scatter = mean.copy(), scatter.copy()
            return self
        total = self.count + n
        delta = mean - self._mean
        # Chan et al.: the scatter of the union is both scatters plus the between-group term.
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance with 1/N), float64. Needs at least one item."""
        if self.count == 0:
            raise ValueError("no features were added")
        cov = self._scatter / self.count
        return self._mean.copy(), (cov + cov.T) / 2  # exactly symmetric


# ----------------------------------------------------------------------------- distance


@dataclass(frozen=True)
class Frechet:
    """A Fréchet distance and its parts (all float64 arithmetic)."""

    value: float  # d^2 = mean_term + trace_term, >= 0 (this is "the FVD" / "the FID")
    mean_term: float  # ||mu_1 - mu_2||^2
    trace_term: float  # tr S_1 + tr S_2 - 2 tr (S_1 S_2)^(1/2)
    trace_sqrt: float  # tr (S_1 S_2)^(1/2)
    method: str  # "eigh" (default) or "sqrtm" (the reference's formula)
    notes: tuple[str, ...] = field(default=())  # what was regularised or clamped, and why

    def to_dict(self) -> dict:
        return {"value": self.value, "mean_term": self.mean_term, "trace_term": self.trace_term,
                "trace_sqrt": self.trace_sqrt, "method": self.method, "notes": list(self.notes)}


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh") -> Frechet:
    """Fréchet (2-Wasserstein) distance d^2 between N(mu1, sigma1) and N(mu2, sigma2).

    mu: (D,), sigma: (D, D) symmetric positive semi-definite (numpy or torch; computed in
    float64). method "eigh": the stable nuclear-norm form (module docstring); "sqrtm": the
    reference's scipy.linalg.sqrtm(S_1 S_2) with an eps * I fallback. Raises ValueError naming
    the argument for a wrong shape, non-finite entries or a matrix that is not a covariance."""
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    mu1, mu2 = _vector(mu1, "mu1"), _vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 differ in shape: {mu1.shape} vs {mu2.shape}")
    D = mu1.shape[0]
    sigma1, sigma2 = _covariance(sigma1, "sigma1", D), _covariance(sigma2, "sigma2", D)
    w1, V1 = _eigh_psd(sigma1, "sigma1")
    w2, V2 = _eigh_psd(sigma2, "sigma2")
    notes: list[str] = []
    if method == "eigh":
        trace_sqrt = _trace_sqrt_eigh(w1, V1, w2, V2)
    else:
        trace_sqrt = _trace_sqrt_sqrtm(sigma1, sigma2, notes)
        if trace_sqrt is None:
            trace_sqrt = _trace_sqrt_eigh(w1, V1, w2, V2)
            notes.append("sqrtm failed even with eps * I added; used the eigen-decomposition instead")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    tr1, tr2 = float(np.trace(sigma1)), float(np.trace(sigma2))
    scale = tr1 + tr2 + mean_term
    value = mean_term + tr1 + tr2 - 2.0 * trace_sqrt
    if method == "sqrtm" and value < -ROUNDING * scale:
        # sqrtm of a (near-)singular product is inaccurate: the reference records such values
        notes.append(f"sqrtm gave a negative distance {value:.6g} (inaccurate square root of a near-singular "
                     "S_1 S_2); used the eigen-decomposition instead")
        trace_sqrt = _trace_sqrt_eigh(w1, V1, w2, V2)
        value = mean_term + tr1 + tr2 - 2.0 * trace_sqrt
    trace_term = tr1 + tr2 - 2.0 * trace_sqrt
    if value < 0:
        if -value > ROUNDING * scale and -value > 1e3 * EPS64:
            raise RuntimeError(f"Fréchet distance came out {value:.6g} (scale {scale:.6g}), beyond rounding: "
                               "a bug in the eigen-method; please report it")
        notes.append(f"clamped {value:.3g} to 0: float64 rounding of statistics that are (numerically) identical")
        value = 0.0
    return Frechet(float(value), mean_term, float(trace_term), float(trace_sqrt), method, tuple(notes))


def frechet_from_stats(a: FeatureStats, b: FeatureStats, method: str = "eigh") -> Frechet:
    """Fréchet distance between the Gaussian fits of two feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"feature sets differ in dimension: {a.dim} vs {b.dim}")
    return frechet_distance(*a.mean_cov(), *b.mean_cov(), method=method)


def _vector(x, name: str) -> np.ndarray:
    x = _as64(x)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a vector (D,), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has NaN/inf entries")
    return x


def _covariance(s, name: str, D: int) -> np.ndarray:
    s = _as64(s)
    if s.shape != (D, D):
        raise ValueError(f"{name} must be ({D}, {D}) to match the means, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} has NaN/inf entries")
    scale = max(float(np.abs(s).max()), np.finfo(np.float64).tiny)
    if float(np.abs(s - s.T).max()) > 1e-8 * scale:
        raise ValueError(f"{name} is not symmetric (largest |S - S^T| {np.abs(s - s.T).max():.3g}); "
                         "not a covariance matrix")
    return (s + s.T) / 2


def _as64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _eigh_psd(s: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a covariance, eigenvalues at the rounding level set to exactly 0.

    Below D * eps * largest an eigenvalue is not resolved by float64 (numpy's matrix_rank uses
    the same threshold); keeping its noise would add sqrt(noise) ~ 1e-8 * largest per dimension
    to the trace. A clearly negative eigenvalue means the matrix is not a covariance."""
    w, V = np.linalg.eigh(s)
    top = max(float(w[-1]), 0.0)
    threshold = s.shape[0] * EPS64 * top
    if w[0] < -max(1e3 * threshold, 1e-12 * top, np.finfo(np.float64).tiny):
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w[0]:.3g}, largest {top:.3g}); "
                         "not a covariance matrix")
    return np.where(w > threshold, w, 0.0), V


def _trace_sqrt_eigh(w1: np.ndarray, V1: np.ndarray, w2: np.ndarray, V2: np.ndarray) -> float:
    """tr (S_1 S_2)^(1/2) = || S_1^(1/2) S_2^(1/2) ||_* (sum of singular values)."""
    r1 = (V1 * np.sqrt(w1)) @ V1.T
    r2 = (V2 * np.sqrt(w2)) @ V2.T
    return float(np.linalg.svd(r1 @ r2, compute_uv=False).sum())


def _trace_sqrt_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, notes: list[str]) -> float | None:
    """The reference's tr Re sqrtm(S_1 S_2); on failure retried with eps * I added to both
    covariances (eps relative to their mean eigenvalue). None when every try fails."""
    from scipy import linalg

    D = sigma1.shape[0]
    unit = max((np.trace(sigma1) + np.trace(sigma2)) / (2 * D), np.finfo(np.float64).tiny)
    eye = np.eye(D)
    for k, rel in enumerate((0.0, *SQRTM_OFFSETS)):
        off = rel * unit * eye
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "matrix is singular" and friends: judged below
            try:
                root = linalg.sqrtm((sigma1 + off) @ (sigma2 + off))
            except (ValueError, np.linalg.LinAlgError) as e:
                with_eps = f" with eps = {rel:g} * mean eigenvalue" if k else ""
                notes.append(f"sqrtm raised {type(e).__name__}{with_eps}")
                continue
        root = np.asarray(root)
        diag = np.diagonal(root)
        why = None
        if not np.isfinite(root).all():
            why = "non-finite entries"
        elif np.iscomplexobj(root):
            imag = float(np.abs(diag.imag).max())
            if imag > IMAG_TOLERANCE * max(float(np.abs(diag.real).max()), np.finfo(np.float64).tiny):
                why = f"imaginary part {imag:.3g} on the diagonal"
        if why is None:
            if k:
                notes.append(f"sqrtm(S_1 S_2) was ill-conditioned; used eps * I with eps = {rel:g} * mean eigenvalue")
            trace = float(np.real(np.trace(root)))
            # the offset adds about eps * (tr S_1^(-1/2) S_2^(1/2) + ...) > 0; it is part of the
            # regularised answer and is reported, not corrected
            return trace
        notes.append(f"sqrtm(S_1 S_2) gave {why}" + (f" with eps = {rel:g} * mean eigenvalue" if k else ""))
    return None

