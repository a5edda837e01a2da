"""Restricted models recover axon diameters on the strong-gradient fixture scheme, and
diameters below the resolution limit are flagged."""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import reference_scheme

from fingerprint.fitting.quality import FLAGS, voxel_quality
from fingerprint.fitting.resolution import (
    below_resolution,
    diameter_estimates,
    diameter_resolution_limit,
)
from fingerprint.models import get_model
from fingerprint.phantoms import model_phantom


@pytest.fixture(scope="module")
def activeax_scheme(reference_dir):
    return reference_scheme(reference_dir, "activeax")


def test_resolution_limit_follows_nilsson(activeax_scheme):
    """d_min = (768/7 z/(SNR sqrt n) D0 / (gamma² delta g²))^(1/4) of the best shell
    (here 140 mT/m, 8 ms or 200 mT/m, 5 ms; 32 directions)."""
    gamma = 2.67513e8
    best = min(768 / 7 * 1.6449 / (30 * np.sqrt(32)) * 1.7e-9 / (gamma ** 2 * d * g ** 2)
               for g, d in ((0.06, 0.02), (0.1, 0.01), (0.14, 0.008), (0.2, 0.005)))
    limit = float(diameter_resolution_limit(activeax_scheme, 30.0))
    assert limit == pytest.approx(best ** 0.25, rel=1e-6)
    assert 3e-6 < limit < 4e-6
    # lower SNR, higher limit; d ∝ SNR^(-1/4)
    assert float(diameter_resolution_limit(activeax_scheme, 15.0)) == \
        pytest.approx(limit * 2 ** 0.25, rel=1e-9)


def test_no_timing_no_limit(reference_dir):
    from fingerprint.io.gradients import read_bvals_bvecs

    hcp = read_bvals_bvecs(reference_dir / "schemes" / "hcp.bval",
                           reference_dir / "schemes" / "hcp.bvec")
    assert np.isnan(diameter_resolution_limit(hcp, 30.0))


def test_diameters_of_each_restricted_model():
    truth = {"activeax": None, "charmed": None, "axcaliber": None}
    for name in truth:
        model = get_model(name)
        from fingerprint.phantoms import model_truth

        params = model_truth(name, 4, seed=0)
        d = diameter_estimates(model, params)
        assert d is not None and d.shape == (4,) and np.all((d > 1e-7) & (d < 3e-5))
    assert diameter_estimates(get_model("noddi"), np.zeros((2, 7))) is None


@pytest.mark.parametrize("name", ["activeax", "charmed"])
def test_noise_free_diameters_above_the_limit_are_recovered(name, activeax_scheme, tmp_path):
    """Noise-free phantoms (diameters 2-10 um) fitted with the polish: diameters above
    the SNR-30 resolution limit recovered (at least 90 % within 0.3 um, median error
    below 0.1 um, correlation above 0.99 among those)."""
    ph = model_phantom(name, activeax_scheme, 30, seed=2)
    model = get_model(name)
    fitted = model.fit(activeax_scheme, ph["signals"], dictionary_size=20000,
                       dictionary_dir=tmp_path, refine="nonlinear")
    d_true = diameter_estimates(model, ph["parameters"])
    d_fit = diameter_estimates(model, fitted.fitted_parameters_vector)
    above = d_true > float(diameter_resolution_limit(activeax_scheme, 30.0))
    assert above.sum() >= 15
    close = np.abs(d_fit - d_true)[above] < 0.3e-6
    # a few voxels may settle on a vanishing restricted fraction, where the diameter is
    # free (CHARMED, 5 dimensions): at least 90 % within 0.3 um
    assert close.mean() >= 0.9
    assert np.median(np.abs(d_fit - d_true)[above]) < 0.1e-6
    assert np.corrcoef(d_fit[above][close], d_true[above][close])[0, 1] > 0.99


def test_below_resolution_flag(activeax_scheme):
    """Estimated diameters under the limit at the voxel's own SNR carry the flag."""
    model = get_model("activeax")
    params = np.repeat(model_phantom("activeax", activeax_scheme, 1)["parameters"], 3, 0)
    col = model.parameter_layout.slices["C4CylinderGaussianPhaseApproximation_1_diameter"]
    params[:, col] = np.array([[1e-6], [3e-6], [8e-6]])
    snr = np.array([30.0, 30.0, 30.0])
    assert below_resolution(model, activeax_scheme, params, snr).tolist() == \
        [True, True, False]

    class _VE:
        parameters = params
        valid = np.ones(3, dtype=bool)
        s0 = np.full(3, 300.0)
        sigma = np.full(3, 10.0)

    class _Fitter:
        pass

    fitter = _Fitter()
    fitter.model, fitter.scheme = model, activeax_scheme
    flags = voxel_quality(fitter, _VE())["quality"]
    assert [bool(f & FLAGS["below_resolution"]) for f in flags] == [True, True, False]


def test_below_resolution_counts_half_the_posterior_spread(activeax_scheme):
    """With the fit's uncertainty, a diameter is flagged unless it lies more than half
    its posterior standard deviation above the limit; AxCaliber's mean diameter has no
    spread of its own (its estimate alone decides)."""
    from fingerprint.fitting.resolution import FLAG_SPREAD

    model = get_model("activeax")
    params = np.repeat(model_phantom("activeax", activeax_scheme, 1)["parameters"], 3, 0)
    col = model.parameter_layout.slices["C4CylinderGaussianPhaseApproximation_1_diameter"]
    limit = float(diameter_resolution_limit(activeax_scheme, 30.0))
    params[:, col] = limit + 1e-6
    unc = np.full_like(params, np.nan)
    unc[:, col] = np.array([[0.0], [1.9e-6], [2.1e-6]])
    assert FLAG_SPREAD == 0.5
    snr = np.full(3, 30.0)
    assert below_resolution(model, activeax_scheme, params, snr, unc).tolist() == \
        [False, False, True]
    assert not below_resolution(model, activeax_scheme, params, snr).any()
    # NaN spread counts as none
    unc[:, col] = np.nan
    assert not below_resolution(model, activeax_scheme, params, snr, unc).any()
    ax = get_model("axcaliber")
    p_ax = model_phantom("axcaliber", activeax_scheme, 2, seed=1)["parameters"]
    np.testing.assert_array_equal(
        below_resolution(ax, activeax_scheme, p_ax, np.full(2, 30.0), np.ones_like(p_ax)),
        below_resolution(ax, activeax_scheme, p_ax, np.full(2, 30.0)))


def test_quality_flag_uses_the_fit_spread(activeax_scheme):
    model = get_model("activeax")
    params = np.repeat(model_phantom("activeax", activeax_scheme, 1)["parameters"], 2, 0)
    col = model.parameter_layout.slices["C4CylinderGaussianPhaseApproximation_1_diameter"]
    params[:, col] = float(diameter_resolution_limit(activeax_scheme, 30.0)) + 1e-6
    unc = np.zeros_like(params)
    unc[1, col] = 4e-6

    class _VE:
        parameters = params
        uncertainty = unc
        valid = np.ones(2, dtype=bool)
        s0 = np.full(2, 300.0)
        sigma = np.full(2, 10.0)

    class _Fitter:
        pass

    fitter = _Fitter()
    fitter.model, fitter.scheme = model, activeax_scheme
    flags = voxel_quality(fitter, _VE())["quality"]
    assert [bool(f & FLAGS["below_resolution"]) for f in flags] == [False, True]
