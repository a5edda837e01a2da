"""How well can any method recover axon diameters on the restricted-model phantoms? A Bayes bound.

    python scripts/bench_diameter_bound.py [--voxels 60] [--snr 30 15] [--samples 4000]

For the phantoms of ``scripts/bench_diameters.py`` (``fingerprint.phantoms.model_phantom``
on the ``activeax`` fixture scheme, same seed), each voxel's diameter is estimated by an
*oracle*: the posterior under the phantom's own prior (``model_truth``: flat Dirichlet
fractions with a floor, scalars uniform in ``model_truth_ranges``) with the exact Rician
likelihood of the voxel's measurements, knowing S0, the noise level and the true fibre
axis. The posterior mean minimises the expected squared error and the posterior median
the expected absolute error of *any* estimator on this phantom; knowing the axis, S0 and
sigma only helps, so the oracle's MAE is a lower bound (up to Monte-Carlo error) of what
any fit of these data can reach.

The posterior is integrated by adaptive importance sampling per voxel: ``--samples``
draws from the prior, then ``--stages`` rounds of draws from a defensive mixture (20 %
prior, 80 % a Student-t fitted to the weighted draws so far, covariance inflated), all
draws pooled with their importance weights. The effective sample size of each voxel is
reported (its median and minimum over voxels).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy.special import i0e

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fingerprint.fitting.resolution import diameter_estimates  # noqa: E402
from fingerprint.models import get_model  # noqa: E402
from fingerprint.phantoms import MIN_FRACTION, model_truth_ranges  # noqa: E402

MODELS = ("activeax", "axcaliber", "charmed")


class Prior:
    """The phantom's prior of a named model in free coordinates u: the first k-1 volume
    fractions (each >= the floor, sum <= 1 - floor), then the scalars (uniform boxes).
    The orientation is held at the voxel's true one."""

    def __init__(self, name: str, recipe_ranges: bool = False) -> None:
        self.model = get_model(name)
        layout = self.model.parameter_layout
        self.P = int(sum(self.model.parameter_cardinality.values()))
        pv = list(getattr(self.model, "partial_volume_names", []) or [])
        self.k = len(pv)
        self.pv_cols = [layout.slices[n].start for n in pv]
        self.floor = min(MIN_FRACTION, 0.5 / self.k) if self.k else 0.0
        ranges = model_truth_ranges(name)
        if recipe_ranges:  # what a method knows without the phantom: the fit's bounds
            ranges = {k: _fit_range(name, k) for k in ranges}
        self.scalar_cols = [layout.slices[n].start for n in ranges]
        self.lo = np.array([r[0] for r in ranges.values()])
        self.hi = np.array([r[1] for r in ranges.values()])
        self.scale = self.hi - self.lo
        m = max(self.k - 1, 0)
        # volume of the support: shrunken simplex x box
        simplex = (1.0 - self.k * self.floor) ** m / math.factorial(m) if self.k else 1.0
        self.log_density = -math.log(simplex) - float(np.sum(np.log(self.scale)))
        self.dim = m + len(self.scalar_cols)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, dim) draws of the prior in u."""
        parts = []
        if self.k:
            f = self.floor + (1.0 - self.k * self.floor) * rng.dirichlet(np.ones(self.k), n)
            parts.append(f[:, :-1])
        parts.append(self.lo + self.scale * rng.random((n, len(self.lo))))
        return self.normalise(np.hstack(parts))

    def normalise(self, u_si: np.ndarray) -> np.ndarray:
        """SI coordinates -> unit-scaled u (scalars divided by their range widths)."""
        u = u_si.copy()
        m = max(self.k - 1, 0)
        u[:, m:] = u[:, m:] / self.scale
        return u

    def inside(self, u: np.ndarray) -> np.ndarray:
        m = max(self.k - 1, 0)
        ok = np.ones(u.shape[0], dtype=bool)
        if self.k:
            f = u[:, :m]
            last = 1.0 - f.sum(axis=1)
            ok &= np.all(f >= self.floor, axis=1) & (last >= self.floor)
        s = u[:, m:] * self.scale
        ok &= np.all((s >= self.lo) & (s <= self.hi), axis=1)
        return ok

    def vectors(self, u: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """Parameter vectors (n, P) from u (n, dim) and the orientation (2,)."""
        m = max(self.k - 1, 0)
        x = np.zeros((u.shape[0], self.P))
        x[:, :2] = mu  # every model here lists its orientation first
        if self.k:
            x[:, self.pv_cols[:-1]] = u[:, :m]
            x[:, self.pv_cols[-1]] = 1.0 - u[:, :m].sum(axis=1)
        x[:, self.scalar_cols] = u[:, m:] * self.scale
        return x


def _fit_range(name: str, parameter: str) -> tuple[float, float]:
    """The range the named model's fit (its dictionary) spans for ``parameter`` (SI)."""
    from fingerprint.dictionary.sampling import ParameterSpace
    from fingerprint.models import get_recipe

    sampled = dict(get_recipe(name).sampling.get("ranges", {}))
    if parameter in sampled:
        lo, hi = sampled[parameter]
        return float(lo), float(hi)
    (p,) = [p for p in ParameterSpace.from_model(get_model(name)).parameters
            if p.name == parameter]
    return float(p.bounds[0][0]), float(p.bounds[0][1])


def rician_loglik(pred: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """Sum over measurements of the Rician log-likelihood of magnitudes ``y`` (N,) given
    noise-free signals ``pred`` (n, N) (all in units of S0), up to a constant."""
    s2 = sigma * sigma
    z = pred * y[None, :] / s2
    return np.sum(-(pred * pred) / (2.0 * s2) + np.log(i0e(z)) + z, axis=1)


def _t_logpdf(u: np.ndarray, mean: np.ndarray, chol: np.ndarray, df: float) -> np.ndarray:
    d = u.shape[1]
    sol = np.linalg.solve(chol, (u - mean).T)
    maha = np.sum(sol * sol, axis=0)
    logdet = 2.0 * np.sum(np.log(np.diag(chol)))
    return (math.lgamma((df + d) / 2) - math.lgamma(df / 2) - 0.5 * d * math.log(df * math.pi)
            - 0.5 * logdet - 0.5 * (df + d) * np.log1p(maha / df))


def voxel_posterior(prior: Prior, scheme: object, y: np.ndarray, mu: np.ndarray,
                    sigma: float, rng: np.random.Generator, samples: int, stages: int,
                    df: float = 5.0, defensive: float = 0.2
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Pooled draws (n, P), normalised importance weights (n,) and the effective sample
    size of one voxel's posterior."""
    us, logws = [], []
    u = prior.sample(samples, rng)
    us.append(u)
    logws.append(rician_loglik(prior.model.simulate_signal(scheme, prior.vectors(u, mu)),
                               y, sigma))
    for _ in range(stages):
        allu, lw = np.vstack(us), np.concatenate(logws)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        mean = w @ allu
        cov = (allu - mean).T @ ((allu - mean) * w[:, None])
        cov = 2.0 * cov + 1e-8 * np.eye(prior.dim)
        chol = np.linalg.cholesky(cov)
        n_t = rng.binomial(samples, 1.0 - defensive)
        g = rng.standard_normal((n_t, prior.dim))
        scale = np.sqrt(df / rng.chisquare(df, n_t))
        u = np.vstack([mean + (g @ chol.T) * scale[:, None], prior.sample(samples - n_t, rng)])
        ok = prior.inside(u)
        u = u[ok]
        log_q = np.logaddexp(math.log(defensive) + prior.log_density,
                             math.log(1.0 - defensive) + _t_logpdf(u, mean, chol, df))
        pred = prior.model.simulate_signal(scheme, prior.vectors(u, mu))
        us.append(u)
        logws.append(rician_loglik(pred, y, sigma) + prior.log_density - log_q)
    allu, lw = np.vstack(us), np.concatenate(logws)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return prior.vectors(allu, mu), w, float(1.0 / np.sum(w * w))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def diameter_bound(name: str, scheme: object, phantom: dict[str, np.ndarray], snr: float, *,
                   samples: int = 4000, stages: int = 3, seed: int = 0,
                   recipe_ranges: bool = False) -> dict[str, np.ndarray]:
    """Posterior mean and median diameters (m) and effective sample sizes (n,) of the
    voxels of ``phantom`` (``model_phantom`` output at b=0 SNR ``snr``). With
    ``recipe_ranges`` the scalars' prior is uniform over the fit's ranges (the recipe's
    dictionary) instead of the phantom's: what an estimator knows without the phantom."""
    prior = Prior(name, recipe_ranges)
    truth = np.asarray(phantom["parameters"], dtype=np.float64)
    y_all = np.asarray(phantom["signals"], dtype=np.float64) / float(phantom["s0"])
    sigma = 1.0 / float(snr)
    rng = np.random.default_rng(seed)
    n = truth.shape[0]
    mean, median, ess = np.zeros(n), np.zeros(n), np.zeros(n)
    for v in range(n):
        x, w, ess[v] = voxel_posterior(prior, scheme, y_all[v], truth[v, :2], sigma, rng,
                                       samples, stages)
        d = diameter_estimates(prior.model, x)
        mean[v] = float(w @ d)
        median[v] = weighted_median(d, w)
    return {"mean": mean, "median": median, "ess": ess}


def main(argv: list[str] | None = None) -> int:
    from reference_helpers import default_reference_dir, reference_scheme

    from fingerprint.fitting.resolution import diameter_resolution_limit
    from fingerprint.phantoms import model_phantom

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=60)
    parser.add_argument("--snr", type=float, nargs="+", default=[30.0, 15.0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--recipe-ranges", action="store_true",
                        help="prior uniform over the fit's ranges, not the phantom's")
    args = parser.parse_args(argv)
    scheme = reference_scheme(default_reference_dir(), "activeax")
    for name in args.models:
        model = get_model(name)
        for snr in args.snr:
            ph = model_phantom(name, scheme, args.voxels, seed=5, snr=snr)
            d_true = diameter_estimates(model, ph["parameters"])
            d_min = float(diameter_resolution_limit(scheme, snr))
            res = diameter_bound(name, scheme, ph, snr, samples=args.samples,
                                 stages=args.stages, recipe_ranges=args.recipe_ranges)
            above = d_true > d_min
            for key in ("median", "mean"):
                err = np.abs(res[key] - d_true) * 1e6
                print(f"{name} SNR {snr:g} posterior {key}: MAE {err.mean():.2f} um "
                      f"(above d_min {err[above].mean():.2f}, below "
                      f"{err[~above].mean() if (~above).any() else float('nan'):.2f}), "
                      f"r {np.corrcoef(res[key], d_true)[0, 1]:.2f}; ESS median "
                      f"{np.median(res['ess']):.0f}, min {res['ess'].min():.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
