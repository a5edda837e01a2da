"""The Rician posterior over many neighbours (fingerprint.fitting.posterior) that the
restricted models' recipes turn on: its likelihood kernel against SciPy and the
reconstructed atom signals, the recipe setting and its validation, the off switch
(refine=False), seeded voxels, and the gain in diameter accuracy on a noisy phantom."""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import reference_scheme
from scipy.special import i0e

from fingerprint.errors import InputError
from fingerprint.fitting.estimator import FingerprintEstimator
from fingerprint.fitting.frame import angles_to_frames
from fingerprint.fitting.posterior import _zonal_basis, rician_posterior
from fingerprint.fitting.resolution import diameter_estimates
from fingerprint.kernels import run_parallel
from fingerprint.kernels.posterior import log_i0e, rician_neighbour_loglik
from fingerprint.models import describe_model, get_model, model_posterior_neighbors
from fingerprint.phantoms import model_phantom
from fingerprint.recipes import load_recipe


@pytest.fixture(scope="module")
def activeax_scheme(reference_dir):
    return reference_scheme(reference_dir, "activeax")


@pytest.fixture(scope="module")
def estimator(activeax_scheme, tmp_path_factory):
    return FingerprintEstimator.from_model(
        "activeax", activeax_scheme, dictionary_size=5000,
        dictionary_dir=tmp_path_factory.mktemp("dict"))


def test_log_i0e_matches_scipy():
    x = np.concatenate([np.linspace(0.0, 5.0, 501), np.geomspace(5.0, 1e6, 200)])
    ours = np.array([log_i0e(v) for v in x])
    np.testing.assert_allclose(ours, np.log(i0e(x)), rtol=0, atol=1e-6)


def test_loglik_kernel_matches_the_reconstructed_atoms(estimator, activeax_scheme):
    """The kernel's atom signals are the atoms' zonal series in the voxel's frame
    (FeatureMap.reconstruct), and its sum the Rician log-likelihood (SciPy's i0e)."""
    rng = np.random.default_rng(3)
    frames = angles_to_frames(np.array([[0.4, 1.0], [2.0, -2.5]]))
    idx = rng.integers(0, estimator.atom_parameters.shape[0], (2, 7))
    idx[1, 3] = -1
    dw = ~np.asarray(activeax_scheme.b0_mask, dtype=bool)
    y = np.abs(rng.normal(0.3, 0.2, (2, int(dw.sum()))))
    sig2 = np.array([1e-3, 4e-3])
    basis = np.ascontiguousarray(_zonal_basis(estimator, frames)[:, :, dw])
    ll = run_parallel(rician_neighbour_loglik, y, idx, estimator.atom_features, basis, sig2)
    fmap = estimator.feature_map
    for i in range(2):
        for a in range(7):
            if idx[i, a] < 0:
                assert ll[i, a] == -np.inf
                continue
            pred = fmap.reconstruct(estimator.atom_features[idx[i, a]][None],
                                    frames[i:i + 1])[0, dw]
            pred = np.maximum(pred, 0.0)
            z = pred * y[i] / sig2[i]
            ref = np.sum(np.log(i0e(z)) + z - pred ** 2 / (2 * sig2[i]))
            assert ll[i, a] == pytest.approx(ref, rel=1e-7, abs=2e-4)


def test_posterior_brings_noisy_diameters_closer(estimator, activeax_scheme):
    """SNR 20 ActiveAx phantom: the posterior over 1000 atoms has a lower diameter error
    than the 32-neighbour match it starts from, keeps fractions on the simplex, the axis,
    and reports a wider (honest) diameter spread."""
    model = get_model("activeax")
    ph = model_phantom("activeax", activeax_scheme, 120, seed=8, snr=20)
    ve = estimator.estimate(ph["signals"])
    before = ve.parameters.copy()
    unc_before = ve.uncertainty.copy()
    rician_posterior(estimator, ph["signals"], ve, 1000)
    truth = diameter_estimates(model, ph["parameters"])
    err_before = np.abs(diameter_estimates(model, before) - truth).mean()
    err_after = np.abs(diameter_estimates(model, ve.parameters) - truth).mean()
    assert err_after < 0.9 * err_before
    cols = estimator._simplex_columns
    np.testing.assert_allclose(ve.parameters[:, cols].sum(axis=1), 1.0, atol=1e-9)
    assert np.all(ve.parameters[:, cols] >= 0)
    orient = estimator._orientation_columns
    np.testing.assert_array_equal(ve.parameters[:, orient], before[:, orient])
    d_col = model.parameter_layout.slices["C4CylinderGaussianPhaseApproximation_1_diameter"]
    assert np.median(ve.uncertainty[:, d_col]) > np.median(unc_before[:, d_col])
    assert np.all((ve.r2 > 0.5) & (ve.r2 <= 1.0))


def test_posterior_skips_seeded_and_noise_free_voxels(estimator, activeax_scheme):
    ph = model_phantom("activeax", activeax_scheme, 4, seed=1, snr=30)
    ve = estimator.estimate(ph["signals"])
    before = ve.parameters.copy()
    ve.sigma[1] = 0.0  # no noise estimate: nothing to weigh with
    rician_posterior(estimator, ph["signals"], ve, 500,
                     skip=np.array([True, False, False, False]))
    np.testing.assert_array_equal(ve.parameters[:2], before[:2])
    assert not np.array_equal(ve.parameters[2:], before[2:])


def test_restricted_recipes_turn_it_on_and_refine_false_turns_it_off(activeax_scheme, tmp_path):
    assert model_posterior_neighbors("activeax") == 2048
    assert model_posterior_neighbors("charmed") == 512
    assert model_posterior_neighbors("axcaliber") == 2048
    assert model_posterior_neighbors("noddi") is None
    assert "Rician posterior" in describe_model("activeax")["posterior"]
    model = get_model("activeax")
    ph = model_phantom("activeax", activeax_scheme, 6, seed=3, snr=25)
    kw = {"dictionary_size": 3000, "dictionary_dir": tmp_path}
    default = model.fit(activeax_scheme, ph["signals"], **kw).fitted_parameters_vector
    plain = model.fit(activeax_scheme, ph["signals"], refine=False,
                      **kw).fitted_parameters_vector
    est = FingerprintEstimator.from_model("activeax", activeax_scheme, refine=False, **kw)
    np.testing.assert_allclose(plain, est.estimate(ph["signals"]).parameters)
    assert not np.allclose(default, plain)


def test_recipe_posterior_neighbors_is_validated(tmp_path):
    base = 'name = "bad"\ndescription = "x"\n[model]\nmodels = ["C1Stick"]\n'
    bad = tmp_path / "bad.toml"
    for value in ("0", "2.5", '"many"', "true"):
        bad.write_text(base + f"[fit]\nposterior_neighbors = {value}\n")
        with pytest.raises(InputError, match=r"bad.toml.*\[fit\] posterior_neighbors must be "
                                             r"an integer >= 1"):
            load_recipe(bad)
    bad.write_text(base + "[fit]\nposterior_neighbors = 64\n")
    assert load_recipe(bad).posterior_neighbors == 64
