"""Multi-fascicle fingerprinting: rotated zonal atoms, crossing recovery, fascicle counts,
per-fascicle maps through model.fit and ``fingerprint fit``."""

from __future__ import annotations

import dataclasses
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
from numpy.polynomial import legendre
from scipy.optimize import nnls

from fingerprint.core.modeling_framework import MultiCompartmentModel
from fingerprint.core.orientations import angular_error_deg, mu_to_vectors
from fingerprint.errors import InputError
from fingerprint.fitting.engine import prepare_fitter
from fingerprint.fitting.multifascicle import (
    MultiFascicleFitter,
    MultiFascicleSettings,
    fascicle_layout,
    is_multifascicle,
)
from fingerprint.fitting.options import FitOptions
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.kernels.rotational import (
    even_legendre,
    legendre_to_power,
    nnls_small,
    rotated_signals,
)
from fingerprint.models import get_model
from fingerprint.phantoms import (
    add_rician_noise,
    crossing_directions,
    crossing_parameter_vectors,
    default_scheme,
)
from fingerprint.signal_models import cylinder_models, gaussian_models


@pytest.fixture(scope="module")
def scheme():
    return default_scheme()


@pytest.fixture(scope="module")
def bss_fitter(scheme):
    return MultiFascicleFitter(get_model("ball_stick_stick"), scheme)


def _bss_vectors(model, u1, u2, f1, f2, d1=1.7e-9, d2=2.0e-9, d_iso=2.5e-9):
    n = u1.shape[0]
    f1, f2 = np.broadcast_to(f1, (n,)), np.broadcast_to(f2, (n,))
    fr = np.stack([1.0 - f1 - f2, f1, f2], axis=1)
    return crossing_parameter_vectors(
        model, directions=[u1, u2], fractions=fr,
        micro=[{"lambda_par": np.full(n, d1)}, {"lambda_par": np.full(n, d2)}],
        iso={"G1Ball_1_lambda_iso": np.full(n, d_iso)})


def _matched_errors(fitted, model, u1, u2):
    """Per-voxel worst angular error of the two fascicles (fitted order is by fraction)."""
    p = model.parameter_vector_to_parameters(fitted)
    v1, v2 = mu_to_vectors(p["C1Stick_1_mu"]), mu_to_vectors(p["C1Stick_2_mu"])
    straight = np.maximum(angular_error_deg(v1, u1), angular_error_deg(v2, u2))
    swapped = np.maximum(angular_error_deg(v1, u2), angular_error_deg(v2, u1))
    return np.minimum(straight, swapped), straight <= swapped


def test_named_multi_fascicle_models_split_into_fascicles():
    bss = fascicle_layout(get_model("ball_stick_stick"))
    assert bss is not None and bss.fascicles == (1, 2) and bss.isotropic == (0,)
    assert bss.micro == (("C1Stick_1_lambda_par",), ("C1Stick_2_lambda_par",))
    noddi2 = fascicle_layout(get_model("noddi2"))
    assert noddi2 is not None and noddi2.max_fascicles == 2
    assert noddi2.micro[1] == ("SD1WatsonDistributed_2_SD1Watson_1_odi",
                               "SD1WatsonDistributed_2_partial_volume_0")
    assert noddi2.iso_params == ((),)  # free water fixed at 3e-9 m²/s
    for name in ("noddi", "ball_stick"):  # one orientation: the matching path
        assert not is_multifascicle(get_model(name))
    linked = get_model("ball_stick_stick")
    linked.set_equal_parameter("C1Stick_1_lambda_par", "C1Stick_2_lambda_par")
    assert fascicle_layout(linked) is None  # a link across fascicles: not separable


def test_even_legendre_values_and_derivatives():
    values, derivs = np.zeros(8), np.zeros(8)
    for t in (-1.0, -0.3, 0.0, 0.42, 0.97, 1.0):
        even_legendre(t, 8, values, derivs)
        for j in range(8):
            c = np.zeros(2 * j + 1)
            c[-1] = 1.0
            assert values[j] == pytest.approx(legendre.legval(t, c), abs=1e-12)
            assert derivs[j] == pytest.approx(legendre.legval(t, legendre.legder(c)),
                                              abs=1e-9 * max(1, j * j))


def test_power_series_is_the_legendre_series():
    """The polish evaluates atoms as power series in (g.u)^2: the same functions."""
    rng = np.random.default_rng(4)
    coef = rng.standard_normal((3, 2, 9))
    power = legendre_to_power(coef)
    t = np.linspace(-1.0, 1.0, 41)
    for a in range(3):
        for s in range(2):
            full = np.zeros(17)
            full[::2] = coef[a, s]
            want = legendre.legval(t, full)
            got = np.polynomial.polynomial.polyval(t * t, power[a, s])
            np.testing.assert_allclose(got, want, atol=1e-10)


def test_ball_diffusivity_is_polished_between_its_atoms(scheme, bss_fitter):
    """The isotropic compartment's parameter moves continuously in the polish: an
    off-grid ball diffusivity is recovered far inside the atom spacing."""
    model = bss_fitter.model
    values = bss_fitter.tables.iso_values[0, :, 0]
    spacing = float(values[1] - values[0])
    off_grid = float(values[20] + 0.37 * spacing)
    rng = np.random.default_rng(8)
    u1, u2 = crossing_directions(6, 80.0, rng)
    x = _bss_vectors(model, u1, u2, 0.4, 0.3, d_iso=off_grid)
    ve = bss_fitter.fit_voxels(100.0 * model.simulate_signal(scheme, x))
    p = model.parameter_vector_to_parameters(ve.parameters)
    np.testing.assert_allclose(p["G1Ball_1_lambda_iso"], off_grid, atol=0.05 * spacing)


def test_skipping_hopeless_polishes_keeps_the_counts(scheme, bss_fitter):
    """Not polishing a count that cannot win (skip_factor) gives the same counts and
    the same crossing estimates as polishing every count."""
    model = bss_fitter.model
    rng = np.random.default_rng(13)
    n = 40
    u1, u2 = crossing_directions(n, 70.0, rng)
    f1 = np.r_[np.full(n // 2, 0.7), rng.uniform(0.3, 0.45, n // 2)]
    f2 = np.r_[np.zeros(n // 2), rng.uniform(0.15, 0.3, n // 2)]
    x = _bss_vectors(model, u1, u2, f1, f2)
    sig = add_rician_noise(100.0 * model.simulate_signal(scheme, x), 100.0 / 30, rng)
    every = MultiFascicleFitter(model, scheme, MultiFascicleSettings(skip_factor=0.0))
    a, b = bss_fitter.fit_voxels(sig), every.fit_voxels(sig)
    pa = model.parameter_vector_to_parameters(a.parameters)
    pb = model.parameter_vector_to_parameters(b.parameters)
    np.testing.assert_array_equal(pa["partial_volume_2"] > 0, pb["partial_volume_2"] > 0)
    two = pa["partial_volume_2"] > 0
    assert two[n // 2:].all()
    np.testing.assert_allclose(a.parameters[two], b.parameters[two], rtol=1e-9)


def test_count_penalty_trades_crossings_for_splits(scheme, bss_fitter):
    """The information criterion's per-parameter penalty: 0 always takes the eligible
    larger count, a huge one always one fascicle; the default is BIC (log N)."""
    model = bss_fitter.model
    rng = np.random.default_rng(17)
    u1, u2 = crossing_directions(8, 90.0, rng)
    x = _bss_vectors(model, u1, u2, 0.4, 0.3)
    sig = add_rician_noise(100.0 * model.simulate_signal(scheme, x), 100.0 / 30, rng)

    def count(penalty):
        fitter = MultiFascicleFitter(model, scheme, MultiFascicleSettings(penalty=penalty))
        p = model.parameter_vector_to_parameters(fitter.fit_voxels(sig).parameters)
        return 1 + (p["partial_volume_2"] > 0)

    assert np.all(count(None) == 2)
    assert np.all(count(0.0) == 2)
    assert np.all(count(1e6) == 1)
    with pytest.raises(InputError, match="penalty"):
        MultiFascicleSettings(penalty=-1.0)


def test_small_nnls_matches_scipy():
    rng = np.random.default_rng(3)
    for m in (1, 2, 3, 4, 5):
        for _ in range(20):
            a = rng.standard_normal((30, m))
            a[:, 0] = np.abs(a[:, 0])
            y = rng.standard_normal(30)
            ref, _ = nnls(a, y)
            x = np.zeros(m)
            cost = nnls_small(a.T @ a, a.T @ y, m, x)
            np.testing.assert_allclose(x, ref, atol=1e-8)
            assert cost + y @ y == pytest.approx(np.sum((a @ ref - y) ** 2), abs=1e-9)


def test_rotated_atoms_reproduce_the_compartment_signal(scheme, bss_fitter):
    """An atom's Legendre series per shell, rotated to a direction, is the simulated
    stick signal at that direction."""
    model = bss_fitter.model
    tb = bss_fitter.tables
    rng = np.random.default_rng(5)
    u1, u2 = crossing_directions(4, 90.0, rng)
    a = tb.coef.shape[0] // 3
    got = rotated_signals(tb.coef[a], tb.shell, tb.grad, u1)
    x = crossing_parameter_vectors(
        model, directions=[u1, u2], fractions=np.tile([0.0, 1.0, 0.0], (4, 1)),
        micro=[{"lambda_par": np.full(4, tb.micro_values[a, 0])},
               {"lambda_par": np.full(4, 1e-9)}],
        iso={"G1Ball_1_lambda_iso": np.full(4, 3e-9)})
    want = model.simulate_signal(scheme, x)
    np.testing.assert_allclose(got, want, atol=3e-3)


@pytest.mark.parametrize("angle", [60.0, 90.0])
def test_noise_free_crossings_are_recovered(scheme, bss_fitter, angle):
    model = bss_fitter.model
    rng = np.random.default_rng(int(angle))
    n = 10
    u1, u2 = crossing_directions(n, angle, rng)
    f1 = rng.uniform(0.35, 0.45, n)
    f2 = rng.uniform(0.25, 0.32, n)
    x = _bss_vectors(model, u1, u2, f1, f2)
    ve = bss_fitter.fit_voxels(100.0 * model.simulate_signal(scheme, x))
    assert ve.valid.all()
    err, straight = _matched_errors(ve.parameters, model, u1, u2)
    assert np.all(err < 3.0), err
    assert straight.all()  # fascicle 1 is the larger fraction
    p = model.parameter_vector_to_parameters(ve.parameters)
    np.testing.assert_allclose(p["partial_volume_1"], f1, atol=0.03)
    np.testing.assert_allclose(p["partial_volume_2"], f2, atol=0.03)
    np.testing.assert_allclose(p["partial_volume_0"], 1 - f1 - f2, atol=0.03)
    np.testing.assert_allclose(p["C1Stick_1_lambda_par"], 1.7e-9, atol=0.15e-9)
    assert np.all(ve.r2 > 0.999)


def test_fascicle_count_single_and_double(scheme, bss_fitter):
    model = bss_fitter.model
    rng = np.random.default_rng(11)
    n = 24
    u1, u2 = crossing_directions(n, 90.0, rng)
    f1 = np.r_[np.full(n // 2, 0.7), np.full(n // 2, 0.4)]
    f2 = np.r_[np.zeros(n // 2), np.full(n // 2, 0.3)]
    x = _bss_vectors(model, u1, u2, f1, f2)
    sig = add_rician_noise(100.0 * model.simulate_signal(scheme, x), 100.0 / 50, rng)
    ve = bss_fitter.fit_voxels(sig)
    p = model.parameter_vector_to_parameters(ve.parameters)
    count = 1 + (p["partial_volume_2"] > 0)
    assert np.mean(count[: n // 2] == 1) >= 0.9, count
    assert np.mean(count[n // 2:] == 2) >= 0.9, count
    # a voxel with one fascicle: the second has fraction 0 and no direction
    single = count == 1
    assert np.all(np.isnan(p["C1Stick_2_mu"][single]))
    assert np.all(np.isnan(p["C1Stick_2_lambda_par"][single]))
    err = angular_error_deg(mu_to_vectors(p["C1Stick_1_mu"][: n // 2]), u1[: n // 2])
    assert np.median(err) < 3.0


def test_csd_start_directions_recover_crossings(scheme, bss_fitter):
    """Start directions from the CSD peaks (fascicle_directions) give the same
    crossings."""
    model = bss_fitter.model
    fitter = MultiFascicleFitter(model, scheme, MultiFascicleSettings(start="csd"))
    rng = np.random.default_rng(21)
    u1, u2 = crossing_directions(8, 90.0, rng)
    x = _bss_vectors(model, u1, u2, 0.45, 0.3)
    ve = fitter.fit_voxels(100.0 * model.simulate_signal(scheme, x))
    err, _ = _matched_errors(ve.parameters, model, u1, u2)
    assert np.all(err < 3.0), err
    with pytest.raises(InputError, match="start"):
        MultiFascicleSettings(start="dipy")


def test_fitter_pickles_and_gives_the_same_numbers(scheme, bss_fitter):
    model = bss_fitter.model
    rng = np.random.default_rng(2)
    u1, u2 = crossing_directions(6, 75.0, rng)
    sig = 100.0 * model.simulate_signal(scheme, _bss_vectors(model, u1, u2, 0.4, 0.3))
    again = pickle.loads(pickle.dumps(bss_fitter))
    a, b = bss_fitter.fit_voxels(sig), again.fit_voxels(sig)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # each voxel's numbers do not depend on the batch it is fitted in
    c = bss_fitter.fit_voxels(sig[2:4])
    np.testing.assert_array_equal(a.parameters[2:4], c.parameters)


def test_the_builtin_solver_routes_multi_fascicle_models(scheme):
    model = MultiCompartmentModel(models=[gaussian_models.G1Ball(), cylinder_models.C1Stick(),
                                          cylinder_models.C1Stick()])
    fitter = prepare_fitter(model, scheme, FitOptions())
    assert isinstance(fitter, MultiFascicleFitter)
    assert fitter.settings.polish_iterations > 0
    assert prepare_fitter(model, scheme, FitOptions(refine=False)).settings \
        .polish_iterations == 0


def test_model_fit_reports_per_fascicle_parameters(scheme):
    model = get_model("ball_stick_stick")
    rng = np.random.default_rng(8)
    u1, u2 = crossing_directions(6, 90.0, rng)
    x = _bss_vectors(model, u1, u2, 0.45, 0.3)
    fitted = model.fit(scheme, 100.0 * model.simulate_signal(scheme, x).reshape(2, 3, -1))
    assert fitted.solver == "fingerprint"
    vec = fitted.fitted_parameters_vector.reshape(6, -1)
    err, _ = _matched_errors(vec, model, u1, u2)
    assert np.all(err < 3.0)


@pytest.mark.slow
def test_noddi2_crossings_directions_and_counts(scheme):
    model = get_model("noddi2")
    fitter = MultiFascicleFitter(model, scheme)
    rng = np.random.default_rng(4)
    n = 8
    u1, u2 = crossing_directions(n, 90.0, rng)
    fr = np.tile([0.15, 0.5, 0.35], (n, 1))
    micro = [{"SD1Watson_1_odi": np.full(n, 0.1), "partial_volume_0": np.full(n, 0.6)},
             {"SD1Watson_1_odi": np.full(n, 0.2), "partial_volume_0": np.full(n, 0.5)}]
    x = crossing_parameter_vectors(model, directions=[u1, u2], fractions=fr, micro=micro)
    ve = fitter.fit_voxels(100.0 * model.simulate_signal(scheme, x))
    p = model.parameter_vector_to_parameters(ve.parameters)
    assert np.all(p["partial_volume_2"] > 0)
    e1 = angular_error_deg(mu_to_vectors(p["SD1WatsonDistributed_1_SD1Watson_1_mu"]), u1)
    assert np.median(e1) < 3.0
    e2 = angular_error_deg(mu_to_vectors(p["SD1WatsonDistributed_2_SD1Watson_1_mu"]), u2)
    assert np.median(e2) < 3.0
    np.testing.assert_allclose(p["partial_volume_0"], 0.15, atol=0.03)
    np.testing.assert_allclose(p["SD1WatsonDistributed_1_SD1Watson_1_odi"], 0.1, atol=0.02)
    np.testing.assert_allclose(p["SD1WatsonDistributed_2_SD1Watson_1_odi"], 0.2, atol=0.02)
    # each bundle's intra-neurite signal fraction (its fraction x icvf); the extra-neurite
    # signal trades off between the two bundles on a two-shell scheme
    np.testing.assert_allclose(p["partial_volume_1"] * p[
        "SD1WatsonDistributed_1_partial_volume_0"], 0.5 * 0.6, atol=0.03)
    np.testing.assert_allclose(p["partial_volume_2"] * p[
        "SD1WatsonDistributed_2_partial_volume_0"], 0.35 * 0.5, atol=0.03)


def test_cli_writes_per_fascicle_maps_with_sidecars(scheme, tmp_path):
    from fingerprint.cli.main import main

    model = get_model("ball_stick_stick")
    rng = np.random.default_rng(6)
    n = 8
    u1, u2 = crossing_directions(n, 90.0, rng)
    x = _bss_vectors(model, u1, u2, 0.45, 0.3)
    data = (100.0 * model.simulate_signal(scheme, x)).reshape(2, 2, 2, -1)
    dwi = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), dwi)
    bval, bvec = tmp_path / "sub-01_dwi.bval", tmp_path / "sub-01_dwi.bvec"
    write_bvals_bvecs(scheme, bval, bvec)
    out = tmp_path / "out"
    assert main(["fit", "--model", "ball_stick_stick", "--dwi", str(dwi), "--bval", str(bval),
                 "--bvec", str(bvec), "--out", str(out), "--preview", "--no-progress"]) == 0
    for label, units in (("fascicle1Fraction", "n/a"), ("fascicle2LambdaPar", "m^2/s"),
                         ("fascicle2Direction", "n/a"), ("ballFraction", "n/a")):
        nii = out / f"sub-01_model-ballStickStick_param-{label}_dwimap.nii.gz"
        side = json.loads(nii.with_name(nii.name.replace(".nii.gz", ".json")).read_text())
        assert nii.exists() and side["Units"] == units, (label, side["Units"])
    side = json.loads((out / "sub-01_model-ballStickStick_param-fascicle2Fraction_dwimap"
                              ".json").read_text())
    assert side["Fascicle"] == 2 and "largest first" in side["FascicleOrder"]
    direction = np.asarray(nib.load(out / "sub-01_model-ballStickStick_param-"
                                          "fascicle1Direction_dwimap.nii.gz").dataobj)
    assert direction.shape == (2, 2, 2, 3)
    err = angular_error_deg(direction.reshape(-1, 3), u1)
    assert np.all(err < 3.0)
    assert (out / "sub-01_model-ballStickStick_desc-preview.png").exists()


def test_split_directions_lie_in_the_crossing_plane(scheme):
    """The split start turns a direction by +-the half angle in the plane of two
    crossing fascicles, found from the voxel's least-attenuation direction."""
    from fingerprint.fitting.multifascicle import _quadratic_fit, _split_directions

    model = get_model("noddi2")
    rng = np.random.default_rng(31)
    n = 12
    u1, u2 = crossing_directions(n, 60.0, rng)
    micro = [{"SD1Watson_1_odi": np.full(n, 0.15), "partial_volume_0": np.full(n, 0.6)}] * 2
    x = crossing_parameter_vectors(model, directions=[u1, u2],
                                   fractions=np.tile([0.2, 0.4, 0.4], (n, 1)), micro=micro)
    y = model.simulate_signal(scheme, x)
    grad = np.asarray(scheme.gradient_directions, dtype=float)
    grad = np.where(np.asarray(scheme.b0_mask)[:, None], 0.0, grad)
    shell = np.asarray(scheme.shell_indices)
    quad = _quadratic_fit(grad, shell, int(shell.max()) + 1)
    bisector = u1 + np.where(np.sum(u1 * u2, axis=1, keepdims=True) < 0, -u2, u2)
    bisector /= np.linalg.norm(bisector, axis=1, keepdims=True)
    split = _split_directions(y, quad, bisector, np.radians(30.0))
    np.testing.assert_allclose(np.linalg.norm(split, axis=2), 1.0, atol=1e-12)
    straight = np.maximum(angular_error_deg(split[:, 0], u1), angular_error_deg(split[:, 1], u2))
    swapped = np.maximum(angular_error_deg(split[:, 0], u2), angular_error_deg(split[:, 1], u1))
    assert np.all(np.minimum(straight, swapped) < 1.0)


def _noddi2_crossings(model, scheme, n, angle, rng, odi=(0.05, 0.3)):
    u1, u2 = crossing_directions(n, angle, rng)
    f1 = rng.uniform(0.3, 0.45, n)
    f2 = rng.uniform(0.25, 0.3, n)
    micro = [{"SD1Watson_1_odi": np.full(n, odi[k]), "partial_volume_0": np.full(n, 0.6)}
             for k in range(2)]
    x = crossing_parameter_vectors(model, directions=[u1, u2],
                                   fractions=np.stack([1 - f1 - f2, f1, f2], 1), micro=micro)
    return u1, u2, 100.0 * model.simulate_signal(scheme, x)


def _noddi2_errors(model, params, u1, u2):
    p = model.parameter_vector_to_parameters(params)
    two = p["partial_volume_2"] > 0
    v1 = mu_to_vectors(p["SD1WatsonDistributed_1_SD1Watson_1_mu"])
    v2 = np.where(two[:, None], mu_to_vectors(
        np.nan_to_num(p["SD1WatsonDistributed_2_SD1Watson_1_mu"])), v1)
    straight = np.maximum(angular_error_deg(v1, u1), angular_error_deg(v2, u2))
    swapped = np.maximum(angular_error_deg(v1, u2), angular_error_deg(v2, u1))
    return two, np.minimum(straight, swapped), straight <= swapped, p


@pytest.mark.slow
def test_noddi2_60_degree_crossings_are_split_not_merged(scheme):
    """Two dispersed bundles crossing at 60 degrees: the split and swap starts find the
    pair (and which bundle is the dispersed one) where the greedy start alone fits one
    dispersed bundle between them."""
    model = get_model("noddi2")
    fitter = prepare_fitter(model, scheme, FitOptions())
    assert isinstance(fitter, MultiFascicleFitter)
    assert fitter.settings.penalty == 2.0  # the recipe's count penalty
    rng = np.random.default_rng(23)
    n = 30
    u1, u2, clean = _noddi2_crossings(model, scheme, n, 60.0, rng)
    # noise-free: every crossing found, directions and each bundle's ODI right
    two, err, _, p = _noddi2_errors(model, fitter.fit_voxels(clean).parameters, u1, u2)
    assert two.all()
    assert np.all(err < 2.0), err
    odi = np.sort(np.stack([p["SD1WatsonDistributed_1_SD1Watson_1_odi"],
                            p["SD1WatsonDistributed_2_SD1Watson_1_odi"]], 1), axis=1)
    np.testing.assert_allclose(odi, np.tile([0.05, 0.3], (n, 1)), atol=0.02)
    # Rician SNR 30 on a two-shell, 96-measurement scheme: fewer merged crossings and
    # smaller errors than the greedy start alone
    noisy = add_rician_noise(clean, 100.0 / 30, rng)
    greedy = MultiFascicleFitter(model, scheme, dataclasses.replace(
        fitter.settings, split_start=False, swap_start=False))
    two, err, _, _ = _noddi2_errors(model, fitter.fit_voxels(noisy).parameters, u1, u2)
    two_g, err_g, _, _ = _noddi2_errors(model, greedy.fit_voxels(noisy).parameters, u1, u2)
    assert two.mean() >= 0.9, two.mean()  # the greedy start alone: 0.4 (96 measurements)
    assert two_g.mean() < 0.7, two_g.mean()
    assert np.median(err) < 20.0  # worse fascicle of each voxel; greedy alone: ~50
    assert np.median(err) < 0.5 * np.median(err_g)
    with pytest.raises(InputError, match="split_angle_deg"):
        MultiFascicleSettings(split_angle_deg=90.0)


def test_warm_start_recovers_stick_crossings(scheme, bss_fitter):
    """Starting from the middle atom straight into the polish (atom_search=False, the
    dispersed fascicles' default) ends where the atom search does on sticks too."""
    model = bss_fitter.model
    warm = MultiFascicleFitter(model, scheme, MultiFascicleSettings(atom_search=False))
    rng = np.random.default_rng(41)
    u1, u2 = crossing_directions(8, 70.0, rng)
    x = _bss_vectors(model, u1, u2, 0.42, 0.3)
    sig = 100.0 * model.simulate_signal(scheme, x)
    err, straight = _matched_errors(warm.fit_voxels(sig).parameters, model, u1, u2)
    assert np.all(err < 1.0), err
    assert straight.all()
