"""Matching features, fibre frames and the numerical kernels behind them."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre as npleg

from fingerprint.core.orientations import angular_error_deg
from fingerprint.errors import InputError
from fingerprint.fitting.features import FEATURES_VERSION, FeatureMap
from fingerprint.fitting.frame import FrameEstimator, angles_to_frames, frames_to_angles
from fingerprint.fitting.refine import orientation_curvature
from fingerprint.io.gradients import read_bvals_bvecs
from fingerprint.kernels.features import (
    legendre_even,
    legendre_even_with_derivative,
)
from fingerprint.models import get_model


@pytest.fixture(scope="module")
def scheme(reference_dir):
    d = reference_dir / "schemes"
    return read_bvals_bvecs(d / "hcp.bval", d / "hcp.bvec", delta=0.0106, Delta=0.0431)


@pytest.fixture(scope="module")
def noddi():
    return get_model("noddi")


def _random_dirs(n, rng):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[v[:, 2] < 0] *= -1
    return v


def _noddi_vectors(mu_dirs, odi, icvf, iso):
    ang = frames_to_angles(mu_dirs)
    return np.column_stack([ang, odi, icvf, iso, 1.0 - iso])


def _noisy_noddi(noddi, scheme, n, rng, noise):
    """(axes (n, 3), signals (n, N)): random NODDI voxels (odi 0.05-0.9, icvf 0.2-0.9,
    isovf 0-0.4) plus Gaussian noise of standard deviation ``noise``."""
    axes = _random_dirs(n, rng)
    sig = noddi.simulate_signal(scheme, _noddi_vectors(
        axes, rng.uniform(0.05, 0.9, n), rng.uniform(0.2, 0.9, n), rng.uniform(0, 0.4, n)))
    return axes, sig + rng.normal(0, noise, sig.shape)


def test_features_version_is_int():
    assert isinstance(FEATURES_VERSION, int) and FEATURES_VERSION >= 1


def test_legendre_kernels_match_numpy():
    out = np.empty(5)
    dout = np.empty(5)
    for u in (-1.0, -0.3, 0.0, 0.42, 1.0):
        legendre_even(u, 8, out)
        legendre_even_with_derivative(u, 8, np.empty(5), dout)
        for j, ell in enumerate(range(0, 9, 2)):
            c = np.zeros(ell + 1)
            c[ell] = 1.0
            assert out[j] == pytest.approx(npleg.legval(u, c), abs=1e-12)
            assert dout[j] == pytest.approx(npleg.legval(u, npleg.legder(c)), abs=1e-10)


def test_kind_follows_model(scheme, noddi):
    assert FeatureMap.from_model(noddi, scheme).kind == "zonal"
    assert FeatureMap.from_model(get_model("smt_noddi"), scheme).kind == "shell_means"
    fmap = FeatureMap.from_model(noddi, scheme)
    # HCP: three shells of 90 directions, l = 0, 2, 4, 6 each
    assert fmap.n_features == 12
    assert list(fmap.n_coefficients) == [4, 4, 4]
    with pytest.raises(InputError):
        FeatureMap.for_scheme(scheme, "nonsense")


def test_zonal_series_recovered_exactly_in_any_frame(scheme):
    """A per-shell Legendre series around an axis gives back its coefficients when the
    voxel frame is that axis, whatever the axis."""
    fmap = FeatureMap.for_scheme(scheme, "zonal")
    rng = np.random.default_rng(0)
    n = 5
    coef = rng.normal(size=(n, fmap.n_features)) * 0.2
    axes = _random_dirs(n, rng)
    signals = fmap.reconstruct(coef * fmap.weights, axes)
    feats, rss = fmap.voxel_features(signals, axes, return_rss=True)
    np.testing.assert_allclose(fmap.zonal_coefficients(feats), coef, atol=2e-5)
    assert np.all(rss < 1e-8)


def test_voxel_features_of_rotated_atoms_match_canonical_atoms(scheme, noddi):
    """NODDI signals with fibres anywhere, in their own frame, have the features of the
    same tissue along z (what the dictionary stores)."""
    fmap = FeatureMap.from_model(noddi, scheme)
    rng = np.random.default_rng(1)
    n = 20
    odi, icvf, iso = rng.uniform(0.05, 0.9, n), rng.uniform(0.1, 0.9, n), \
        rng.uniform(0, 0.5, n)
    axes = _random_dirs(n, rng)
    z = np.tile([0.0, 0.0, 1.0], (n, 1))
    rotated = noddi.simulate_signal(scheme, _noddi_vectors(axes, odi, icvf, iso))
    canonical = noddi.simulate_signal(scheme, _noddi_vectors(z, odi, icvf, iso))
    atom = fmap.atom_features(canonical.astype(np.float32))
    vox = fmap.voxel_features(rotated, axes)
    # the l <= 6 fit aliases a little of the higher orders, differently per frame
    np.testing.assert_allclose(vox, atom, atol=5e-3 * np.abs(atom).max())


def test_whitened_distance_is_signal_residual(scheme):
    """Squared feature distance ~ squared residual between the two fitted signals."""
    fmap = FeatureMap.for_scheme(scheme, "zonal")
    rng = np.random.default_rng(2)
    axes = np.tile([0.0, 0.0, 1.0], (2, 1))
    coef = rng.normal(size=(2, fmap.n_features)) * 0.1
    sig = fmap.reconstruct(coef * fmap.weights, axes)
    feats = fmap.voxel_features(sig, axes)
    d_feat = float(np.sum((feats[0].astype(float) - feats[1]) ** 2))
    d_sig = float(np.sum((sig[0] - sig[1]) ** 2))
    assert d_feat == pytest.approx(d_sig, rel=0.15)


def test_shell_mean_features(scheme):
    fmap = FeatureMap.for_scheme(scheme, "shell_means")
    rng = np.random.default_rng(3)
    sig = rng.uniform(0.1, 1.0, size=(4, scheme.number_of_measurements))
    feats = fmap.voxel_features(sig)
    shells = np.asarray(scheme.shell_indices)
    per_shell = np.stack([sig[:, shells == s].mean(axis=1)
                          for s in range(int(shells.max()) + 1)], axis=1)
    for i, s in enumerate(fmap.shell_columns):
        sel = (shells == s) & ~np.asarray(scheme.b0_mask)
        w = fmap.mean_weights[sel]
        assert w.sum() == pytest.approx(1.0)
        # HCP's well-spread directions: close to the plain mean
        np.testing.assert_allclose(w * sel.sum(), 1.0, atol=0.25)
        np.testing.assert_allclose(feats[:, i], sig[:, sel] @ w * np.sqrt(sel.sum()),
                                   rtol=1e-5)
        per_shell[:, s] = sig[:, sel] @ w
    # atoms of spherical-mean dictionaries hold one column per shell
    np.testing.assert_allclose(fmap.atom_features(per_shell), feats, rtol=1e-5)


def test_spherical_mean_weights_undo_uneven_sampling():
    """On 40 random (uneven) directions the weighted mean of a stick's signal is close
    to its exact spherical mean, the plain mean is not."""
    from scipy.special import erf

    from fingerprint.fitting.features import spherical_mean_weights

    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(40, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    weights = spherical_mean_weights(dirs)
    assert weights.sum() == pytest.approx(1.0)
    bd = 2e9 * 1.7e-9
    exact = np.sqrt(np.pi) * erf(np.sqrt(bd)) / (2 * np.sqrt(bd))
    errors_plain, errors_weighted = [], []
    for axis in rng.normal(size=(20, 3)):
        axis /= np.linalg.norm(axis)
        signal = np.exp(-bd * (dirs @ axis) ** 2)
        errors_plain.append(abs(signal.mean() - exact))
        errors_weighted.append(abs(weights @ signal - exact))
    assert np.mean(errors_weighted) < 0.01
    assert np.mean(errors_weighted) < 0.5 * np.mean(errors_plain)


def test_signal_features_are_dwis(scheme):
    fmap = FeatureMap.for_scheme(scheme, "signal")
    sig = np.random.default_rng(4).uniform(size=(3, scheme.number_of_measurements))
    np.testing.assert_allclose(fmap.voxel_features(sig), sig[:, ~np.asarray(scheme.b0_mask)],
                               rtol=1e-6)


def test_wrong_width_is_input_error(scheme):
    fmap = FeatureMap.for_scheme(scheme, "zonal")
    with pytest.raises(InputError, match="shape"):
        fmap.voxel_features(np.ones((2, 5)), np.tile([0, 0, 1.0], (2, 1)))


def test_tensor_frame_finds_the_axis(scheme):
    fmap = FeatureMap.for_scheme(scheme, "zonal")
    fe = FrameEstimator.for_scheme(fmap)
    rng = np.random.default_rng(5)
    axes = _random_dirs(50, rng)
    g = np.asarray(scheme.gradient_directions)
    b = np.asarray(scheme.bvalues)
    u = axes @ g.T
    # prolate tensor: 1.7e-9 along the axis, 0.3e-9 across
    sig = np.exp(-b * (0.3e-9 + 1.4e-9 * u ** 2))
    found = fe.tensor_directions(sig)
    assert np.all(np.abs(np.sum(found * axes, axis=1)) > 1 - 1e-8)
    refined = fe.estimate(sig)
    assert np.all(np.abs(np.sum(refined * axes, axis=1)) > 1 - 1e-6)


def test_frame_refinement_reduces_angular_error(scheme, noddi):
    fmap = FeatureMap.from_model(noddi, scheme)
    fe = FrameEstimator.for_scheme(fmap, refine_iterations=2)
    rng = np.random.default_rng(6)
    n = 400
    axes = _random_dirs(n, rng)
    sig = noddi.simulate_signal(scheme, _noddi_vectors(axes, rng.uniform(0.05, 0.3, n),
                                                       rng.uniform(0.4, 0.8, n),
                                                       rng.uniform(0, 0.2, n)))
    noisy = np.abs(sig + rng.normal(0, 1 / 30, sig.shape) + 1j * rng.normal(0, 1 / 30,
                                                                             sig.shape))
    t = fe.tensor_directions(noisy)
    r = fe.refine(noisy, t)

    def err(f):
        return angular_error_deg(f, axes)

    assert np.median(err(r)) < np.median(err(t))


def test_residuals_from_the_fit_equal_direct_evaluation(scheme, noddi):
    """The residual of any coefficients computed from the fit's Gram matrices equals the
    sum of squares of the signal minus the evaluated series (b0s predicted as 1)."""
    fmap = FeatureMap.from_model(noddi, scheme)
    rng = np.random.default_rng(10)
    n = 30
    _, sig = _noisy_noddi(noddi, scheme, n, rng, 0.03)
    frames = _random_dirs(n, rng)
    fit = fmap.voxel_features(sig, frames, return_rss=True, return_gram=True)
    coef = fmap.zonal_coefficients(fit[0]) + rng.normal(0, 0.05, fit[0].shape)
    res, tot = fmap.residuals(sig, fit, coef)
    pred = fmap.reconstruct(coef * fmap.weights, frames)
    np.testing.assert_allclose(res, ((sig - pred) ** 2).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(tot, ((sig - sig.mean(axis=1, keepdims=True)) ** 2).sum(axis=1),
                               rtol=1e-10)
    # at the fitted coefficients the residual is the fit's own
    own, _ = fmap.residuals(sig, fit, fmap.zonal_coefficients(fit[0]))
    b0 = fmap.shell_of < 0
    np.testing.assert_allclose(own, fit[1] + ((sig[:, b0] - 1) ** 2).sum(axis=1), rtol=1e-5)
    with pytest.raises(InputError):
        FeatureMap.for_scheme(scheme, "signal").voxel_features(sig, return_gram=True)


def test_align_recovers_the_axis_of_a_known_profile(scheme, noddi):
    """Noise-free NODDI signals with their own (canonical-frame) Legendre profile: the
    aligned axis is the true one from starts up to ~15 degrees away."""
    fmap = FeatureMap.from_model(noddi, scheme)
    fe = FrameEstimator.for_scheme(fmap)
    rng = np.random.default_rng(8)
    n = 50
    axes = _random_dirs(n, rng)
    vec = _noddi_vectors(axes, rng.uniform(0.05, 0.6, n), rng.uniform(0.3, 0.8, n),
                         rng.uniform(0, 0.3, n))
    sig = noddi.simulate_signal(scheme, vec)
    canonical = vec.copy()
    canonical[:, :2] = 0.0
    profile = fmap.zonal_coefficients(
        fmap.atom_features(noddi.simulate_signal(scheme, canonical)))
    start = axes + rng.normal(0, 0.15, axes.shape)
    start /= np.linalg.norm(start, axis=1, keepdims=True)
    start[start[:, 2] < 0] *= -1
    found = fe.align(sig, start, profile, iterations=8)
    cos = np.abs(np.sum(found * axes, axis=1))
    assert np.all(cos > np.cos(np.radians(0.05)))
    assert np.all(found[:, 2] >= 0)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-12)
    with pytest.raises(InputError, match="frames"):
        fe.align(sig, start[:-1], profile)
    with pytest.raises(InputError, match="coefficients"):
        fe.align(sig, start, profile[:, :-1])
    with pytest.raises(InputError, match="signals"):
        fe.align(sig[:, :-1], start, profile)


def test_align_never_increases_the_residual(scheme, noddi):
    """With a wrong profile (another atom's) and noise, the aligned axis fits the signal
    at least as well as the start: a step that does not lower the residual is undone."""
    fmap = FeatureMap.from_model(noddi, scheme)
    fe = FrameEstimator.for_scheme(fmap)
    rng = np.random.default_rng(9)
    n = 200
    _, sig = _noisy_noddi(noddi, scheme, n, rng, 0.05)
    z = np.tile([0.0, 0.0, 1.0], (n, 1))
    other = _noddi_vectors(z, rng.uniform(0.05, 0.9, n), rng.uniform(0.2, 0.9, n),
                           rng.uniform(0, 0.4, n))
    profile = fmap.zonal_coefficients(fmap.atom_features(noddi.simulate_signal(scheme, other)))
    start = fe.tensor_directions(sig)
    found = fe.align(sig, start, profile)

    def rss(frames):
        fit = fmap.reconstruct(profile * fmap.weights, frames)
        dwi = fmap.dwi_columns
        return ((sig[:, dwi] - fit[:, dwi]) ** 2).sum(axis=1)

    assert np.all(rss(found) <= rss(start) + 1e-12)
    assert np.mean(rss(found) < rss(start) - 1e-9) > 0.5


def test_angles_round_trip():
    rng = np.random.default_rng(7)
    dirs = _random_dirs(10, rng)
    np.testing.assert_allclose(angles_to_frames(frames_to_angles(dirs)), dirs, atol=1e-12)


def test_orientation_curvature_matches_finite_differences(scheme, noddi):
    """J of an atom = sum over measurements of (dS/dtilt)^2 (Gauss-Newton curvature)."""
    fmap = FeatureMap.from_model(noddi, scheme)
    z = np.array([[0.0, 0.0, 1.0]])
    vec = _noddi_vectors(z, np.array([0.1]), np.array([0.7]), np.array([0.1]))
    atom = fmap.atom_features(noddi.simulate_signal(scheme, vec))
    J = orientation_curvature(fmap, atom)[0]
    h = 1e-4
    total = 0.0
    for phi in (0.0, np.pi / 2):  # average of two tilt axes
        tilted = vec.copy()
        tilted[0, 0] = h
        tilted[0, 1] = phi
        s1 = noddi.simulate_signal(scheme, tilted)[0]
        s0 = noddi.simulate_signal(scheme, vec)[0]
        dwi = ~np.asarray(scheme.b0_mask)
        total += np.sum(((s1 - s0)[dwi] / h) ** 2) / 2
    assert J == pytest.approx(total, rel=0.1)
