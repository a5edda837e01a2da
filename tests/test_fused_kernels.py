"""The vectorised (power-basis, shell-grouped) kernels of the fit give the numbers of the
measurement-by-measurement Legendre computations they replace, and fused steps equal
their unfused form. No timings are asserted."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre as npleg

from fingerprint.fitting.features import FeatureMap
from fingerprint.fitting.frame import FrameEstimator, frames_to_angles
from fingerprint.fitting.refine import local_linear_step, weighted_atoms
from fingerprint.io.gradients import read_bvals_bvecs
from fingerprint.kernels.features import (
    _align_general,
    _legendre_to_power,
    align_frames,
    shell_layout,
)
from fingerprint.models import get_model


@pytest.fixture(scope="module")
def scheme(reference_dir):
    d = reference_dir / "schemes"
    return read_bvals_bvecs(d / "hcp.bval", d / "hcp.bvec", delta=0.0106, Delta=0.0431)


@pytest.fixture(scope="module")
def noddi():
    return get_model("noddi")


def _voxels(noddi, scheme, n, rng, noise=0.03):
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    axes[axes[:, 2] < 0] *= -1
    iso = rng.uniform(0, 0.4, n)
    vec = np.column_stack([frames_to_angles(axes), rng.uniform(0.05, 0.9, n),
                           rng.uniform(0.2, 0.9, n), iso, 1.0 - iso])
    sig = noddi.simulate_signal(scheme, vec)
    return axes, sig + rng.normal(0, noise, sig.shape)


def test_shell_layout_groups_measurements_by_shell():
    shell_of = np.array([-1, 1, 0, 1, -1, 0, 2, 1])
    use = np.array([True, True, True, False, True, True, True, True])
    order, starts = shell_layout(shell_of, 3, use)
    assert list(starts) == [0, 2, 4, 5]
    assert list(order) == [2, 5, 1, 7, 6]


def test_power_series_equals_legendre_series():
    rng = np.random.default_rng(1)
    out = np.empty(4)
    for nc in (1, 2, 3, 4):
        c = rng.normal(size=nc)
        _legendre_to_power(c, 0, nc, np.ones(nc), out)
        leg = np.zeros(2 * nc - 1)
        leg[::2] = c
        for u in (-1.0, -0.4, 0.0, 0.3, 0.9):
            x = u * u
            assert out[0] + x * (out[1] + x * (out[2] + x * out[3])) == pytest.approx(
                npleg.legval(u, leg), abs=1e-12)


def test_zonal_features_equal_a_least_squares_fit_per_shell(scheme, noddi):
    """Features, residual and Gram matrices from the moments of u² equal numpy's least
    squares on the Legendre design of each shell."""
    fmap = FeatureMap.from_model(noddi, scheme)
    rng = np.random.default_rng(2)
    n = 40
    _, sig = _voxels(noddi, scheme, n, rng)
    frames = rng.normal(size=(n, 3))
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    feats, rss, gram = fmap.voxel_features(sig, frames, return_rss=True, return_gram=True)
    for i in range(n):
        total = 0.0
        for s, nc in enumerate(fmap.n_coefficients):
            cols = np.flatnonzero(fmap.shell_of == s)
            u = fmap.directions[cols] @ frames[i]
            design = np.stack([npleg.legval(u, np.eye(2 * nc - 1)[2 * a])
                               for a in range(nc)], axis=1)
            coef, *_ = np.linalg.lstsq(design, sig[i, cols], rcond=None)
            o = fmap.offsets[s]
            np.testing.assert_allclose(feats[i, o:o + nc] / fmap.weights[o:o + nc], coef,
                                       rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(gram[i, s, :nc, :nc], design.T @ design, rtol=1e-10,
                                       atol=1e-9)
            total += np.sum((sig[i, cols] - design @ coef) ** 2)
        assert rss[i] == pytest.approx(total, rel=1e-6, abs=1e-12)


def test_vectorised_alignment_equals_the_legendre_one(scheme, noddi):
    """align_frames (series as cubics in u², sums in gradient coordinates) moves every
    axis where the measurement-by-measurement Legendre evaluation does."""
    fmap = FeatureMap.from_model(noddi, scheme)
    fe = FrameEstimator.for_scheme(fmap)
    rng = np.random.default_rng(3)
    n = 200
    _, sig = _voxels(noddi, scheme, n, rng)
    start = fe.tensor_directions(sig)
    profile = fmap.zonal_coefficients(fmap.voxel_features(sig, start))
    profile += rng.normal(0, 0.01, profile.shape)
    nc = np.asarray(fmap.n_coefficients, dtype=np.int64)
    offsets = np.asarray(fmap.offsets, dtype=np.int64)
    fast = align_frames.serial(sig, start, profile, fmap.directions, fmap.shell_of, nc,
                               offsets, 3, fe.max_step)
    reference = start.copy()
    for i in range(n):
        _align_general(sig, i, profile, fmap.directions, fmap.shell_of, nc, offsets, 3,
                       fe.max_step, int(nc.max()), reference)
    np.testing.assert_allclose(fast, reference, atol=1e-9)
    # the parallel version computes the same
    np.testing.assert_array_equal(
        align_frames(sig, start, profile, fmap.directions, fmap.shell_of, nc, offsets, 3,
                     fe.max_step), fast)


def test_fused_refine_shrinkage_equals_the_shrunk_step():
    """The shrinkage of the local-linear step inside the kernel equals scaling the
    unshrunk step (and its predicted features) by min(1, shrinkage / n_eff) afterwards."""
    rng = np.random.default_rng(5)
    n, k, n_atoms, nf = 50, 16, 400, 6
    atom_params = rng.uniform(0, 1, (n_atoms, 4))
    atom_feats = np.column_stack([np.sin(atom_params @ rng.normal(size=4)) for _ in range(nf)])
    idx = np.stack([rng.choice(n_atoms, k, replace=False) for _ in range(n)])
    w = rng.exponential(size=(n, k)) ** 3
    w /= w.sum(axis=1, keepdims=True)
    start = np.einsum("nk,nkp->np", w, atom_params[idx])
    queries = np.einsum("nk,nkf->nf", w, atom_feats[idx]) + rng.normal(0, 0.01, (n, nf))
    cols = np.array([0, 1, 2])
    lo, hi = np.zeros(3), np.ones(3)
    max_step = np.full((n, 3), 0.2)
    args = (queries, idx, w, atom_feats, atom_params, start, cols, lo, hi, max_step)
    plain, plain_pred = local_linear_step(*args)
    shrunk, shrunk_pred = local_linear_step(*args, shrinkage=2.0)
    lam = np.minimum(1.0, 2.0 * (w ** 2).sum(axis=1))
    assert np.any(lam < 1.0)
    expected = start.copy()
    expected[:, cols] = start[:, cols] + lam[:, None] * (plain[:, cols] - start[:, cols])
    np.testing.assert_allclose(shrunk, expected, rtol=1e-12, atol=1e-14)
    base = weighted_atoms(w, idx, atom_feats)
    np.testing.assert_allclose(shrunk_pred, base + lam[:, None] * (plain_pred - base),
                               rtol=1e-10, atol=1e-12)
