"""Classical solvers (brute2fine, mix), cascades and the solver record of fitted models.

Noise-free signals of the dmipy reference fixtures (the exact Watson signals for NODDI)
must be fitted back to their parameters: fractions within 0.01, diffusivities within
2 %, orientations within 2 degrees.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from reference_helpers import load_reference, noddi_watson

from fingerprint.core.modeling_framework import MultiCompartmentModel, mu_to_axes
from fingerprint.errors import InputError
from fingerprint.fitting.solvers.brute2fine import brute_force_grid
from fingerprint.fitting.solvers.common import (
    ClassicalOptions,
    projected_costs,
    sphere_samples,
)
from fingerprint.signal_models.cylinder_models import C1Stick
from fingerprint.signal_models.gaussian_models import G1Ball


@pytest.fixture(scope="module")
def hcp(reference_dir):
    return load_reference(reference_dir, "hcp")


def ball_stick() -> MultiCompartmentModel:
    return MultiCompartmentModel(models=[G1Ball(), C1Stick()])


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.abs(np.sum(mu_to_axes(a) * mu_to_axes(b), axis=1))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def _check_recovery(model, fitted, truth):
    est = fitted.fitted_parameters_vector.reshape(truth.shape)
    pos = 0
    for name, card in model.parameter_cardinality.items():
        sl = slice(pos, pos + card)
        pos += card
        if card == 2:
            assert _angles(est[:, sl], truth[:, sl]).max() < 2.0, name
        elif "partial_volume" in name or name.endswith("odi"):
            np.testing.assert_allclose(est[:, sl], truth[:, sl], atol=0.01, err_msg=name)
        else:  # diffusivities
            np.testing.assert_allclose(est[:, sl], truth[:, sl], rtol=0.02, err_msg=name)


@pytest.mark.parametrize("solver", ["brute2fine", "mix"])
@pytest.mark.parametrize("case", ["BallStick", "NODDIWatson"])
def test_noise_free_reference_recovered(hcp, solver, case):
    _, scheme, signals, _ = hcp
    model = noddi_watson() if case == "NODDIWatson" else ball_stick()
    truth = signals[f"{case}/params"]
    data = signals[f"{case}/signals_exact" if case == "NODDIWatson" else f"{case}/signals"]
    before = model.spec_hash
    fitted = model.fit(scheme, 100.0 * data, solver=solver, number_of_processors=1)
    assert fitted.solver == solver
    assert model.spec_hash == before  # the model is not changed by fitting
    assert fitted.valid.all()
    _check_recovery(model, fitted, truth)
    np.testing.assert_allclose(fitted.S0, 100.0)
    assert np.all(fitted.R2_coefficient_of_determination(100.0 * data) > 0.9999)


def test_fingerprint_solver_recorded_and_amico_refused(hcp):
    _, scheme, signals, _ = hcp
    data = signals["BallStick/signals"]
    model = ball_stick()
    with pytest.raises(InputError, match="amico"):
        model.fit(scheme, data, solver="amico")
    with pytest.raises(InputError, match="brute2fine, dti, fingerprint, mix"):
        model.fit(scheme, data, solver="lbfgs")
    with pytest.raises(InputError, match="'Ns' must be an integer"):
        model.fit(scheme, data, solver="brute2fine", Ns=1)
    with pytest.raises(InputError, match="unknown fit option"):
        model.fit(scheme, data, solver="mix", n_neighbours=3)


def test_grid_follows_dmipy_options():
    model = noddi_watson()
    # odi and the bundle's fraction are gridded; the top-level fractions are projected
    grid = brute_force_grid(model, ClassicalOptions(Ns=4, N_sphere_samples=12))
    assert grid.shape == (12 * 4 * 4, 6)
    assert len({tuple(r) for r in np.round(grid[:, :2], 9)}) == 12
    odi = np.unique(grid[:, 2])
    assert odi.size == 4 and odi.min() > 0.02 and odi.max() < 0.99
    bs = ball_stick()
    grid = brute_force_grid(bs, ClassicalOptions(Ns=3, N_sphere_samples=5))
    assert grid.shape == (5 * 3 * 3, bs.parameter_cardinality and 6)
    dirs = mu_to_axes(sphere_samples(200))
    assert np.all(dirs[:, 2] >= 0) and np.allclose(np.linalg.norm(dirs, axis=1), 1)
    # evenly spread: every direction of a fine set is within 12 degrees of a sample
    fine = mu_to_axes(sphere_samples(5000))
    assert np.degrees(np.arccos(np.max(np.abs(fine @ dirs.T), axis=1).min())) < 12


def test_projected_costs_are_nnls():
    from scipy.optimize import nnls

    rng = np.random.default_rng(3)
    a = rng.random((7, 3, 20))
    y = rng.random((5, 20)) - 0.3
    got = projected_costs(a, y)
    for v in range(5):
        for g in range(7):
            _, r = nnls(a[g].T, y[v])
            assert got[v, g] == pytest.approx(r ** 2, rel=1e-8, abs=1e-12)


def test_cascade_ball_stick_orientation_into_noddi(hcp, caplog):
    _, scheme, signals, _ = hcp
    data = signals["NODDIWatson/signals_exact"][:4]
    truth = signals["NODDIWatson/params"][:4]
    bs = ball_stick().fit(scheme, data, solver="brute2fine", Ns=3)
    noddi = noddi_watson()
    with caplog.at_level(logging.INFO, logger="fingerprint.fitting.initial"):
        fitted = noddi.fit(scheme, data, solver="brute2fine", x0_vector={
            "C1Stick_1_mu": bs.fitted_parameters["C1Stick_1_mu"]})
    assert "SD1WatsonDistributed_1_SD1Watson_1_mu" in caplog.text
    _check_recovery(noddi, fitted, truth)
    # the fingerprint solver takes the same cascade
    fp = noddi.fit(scheme, data, x0_vector={"C1Stick_1_mu": truth[:, :2]},
                   dictionary_size=5000)
    assert _angles(fp.fitted_parameters_vector[:, :2], truth[:, :2]).max() < 1e-6
    # ... also when given straight to the estimator (the same parser, the dictionary's
    # layout): the Watson axis is the stick's
    with caplog.at_level(logging.INFO, logger="fingerprint.fitting.initial"):
        ve = fp.estimator.estimate(data, x0={"C1Stick_1_mu": truth[:, :2]})
    assert _angles(ve.parameters[:, :2], truth[:, :2]).max() < 1e-6
    np.testing.assert_allclose(ve.parameters, fp.fitted_parameters_vector, atol=1e-9)
    with pytest.raises(InputError, match="G2Zeppelin_3_mu"):
        fp.estimator.estimate(data, x0={"G2Zeppelin_3_mu": [0.0, 0.0]})
    with pytest.raises(InputError, match="G2Zeppelin_3_mu"):
        noddi.fit(scheme, data, solver="mix", x0_vector={"G2Zeppelin_3_mu": [0.0, 0.0]})


def test_x0_vector_broadcast_and_per_voxel(hcp):
    _, scheme, signals, _ = hcp
    data = signals["BallStick/signals"][:3].reshape(3, 1, -1)
    truth = signals["BallStick/params"][:3]
    model = ball_stick()
    x0 = np.full(truth.shape, np.nan)
    x0[:, 1:3] = truth[:, 1:3]  # orientations, per voxel
    fitted = model.fit(scheme, data, solver="mix", x0_vector=x0.reshape(3, 1, -1),
                       maxiter=5)
    _check_recovery(model, fitted, truth)
    one = model.fit(scheme, data[:1], solver="brute2fine", x0_vector=truth[0])
    assert _angles(one.fitted_parameters_vector.reshape(1, -1)[:, 1:3],
                   truth[:1, 1:3]).max() < 0.1



def test_fit_volume_runs_classical_solver_and_sidecars_say_so(tmp_path):
    import json

    from fingerprint.fitting.options import FitOptions
    from fingerprint.fitting.pipeline import fit_volume
    from fingerprint.phantoms import noddi_phantom, write_phantom

    phantom = noddi_phantom(shape=(3, 2, 2), seed=1, snr=50)
    paths = write_phantom(phantom, tmp_path / "in", prefix="sub-01")
    result = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], tmp_path / "out",
                        mask=paths["mask"], prefix="sub-01",
                        options=FitOptions.from_mapping({"solver": "brute2fine", "Ns": 4}))
    sidecar = json.loads((result.out_dir / "sub-01_model-noddi_param-odi_dwimap.json"
                          ).read_text())
    assert sidecar["Solver"] == "brute2fine"
    assert result.n_voxels > 0
    # no dictionary, no posterior spread: no uncertainty maps
    assert not [p for p in result.files if "uncertainty" in p.name]
    assert (result.out_dir / "sub-01_model-noddi_param-odi_dwimap.nii.gz").exists()


def test_brute2fine_agrees_with_fingerprint_within_the_noise(hcp):
    """Noisy NODDI phantom (SNR 30): the two solvers differ by less than brute2fine's
    error against the truth (the noise level of the maps)."""
    from fingerprint.phantoms import (
        add_rician_noise,
        noddi_parameter_vectors,
        random_orientations,
    )

    _, scheme, _, _ = hcp
    model = noddi_watson()
    rng = np.random.default_rng(7)
    n = 80
    truth = noddi_parameter_vectors(model, icvf=rng.uniform(0.3, 0.8, n),
                                    odi=rng.uniform(0.05, 0.6, n),
                                    isovf=rng.uniform(0.0, 0.3, n),
                                    mu=random_orientations(n, rng))
    data = add_rician_noise(100.0 * model.simulate_signal(scheme, truth), 100.0 / 30, rng)
    b2f = model.fit(scheme, data, solver="brute2fine").fitted_parameters_vector
    fp = model.fit(scheme, data, dictionary_size=20000).fitted_parameters_vector
    for col in (2, 3, 4):  # odi, intra-neurite fraction, isotropic fraction
        noise = np.mean(np.abs(b2f[:, col] - truth[:, col]))
        assert noise < 0.05
        assert np.mean(np.abs(b2f[:, col] - fp[:, col])) <= noise, col
    assert np.median(_angles(b2f[:, :2], fp[:, :2])) < 2.0


def test_per_voxel_fixed_parameters_stay_in_the_vector():
    """dmipy's layout: a per-voxel fixed map keeps its parameter in the vector, not
    optimised (fitting it: tests/test_dmipy_initial_guess.py)."""
    model = ball_stick()
    model.set_fixed_parameter("G1Ball_1_lambda_iso", np.full((4, 4), 3e-9))
    assert "G1Ball_1_lambda_iso" in model.parameter_names
    assert model.parameter_optimization_flags["G1Ball_1_lambda_iso"] is False


def test_x0_matrix_names_shapes_and_errors():
    from fingerprint.core.parameter_layout import ParameterLayout
    from fingerprint.fitting.initial import resolve_x0_name, x0_matrix

    noddi = noddi_watson()
    P = sum(noddi.parameter_cardinality.values())
    assert x0_matrix(noddi, None, 3) is None
    m = x0_matrix(noddi, {"odi": 0.3, "C1Stick_1_mu": [[0.1, 0.2], [0.3, 0.4]]}, 2)
    assert m.shape == (2, P)
    np.testing.assert_array_equal(m[:, :2], [[0.1, 0.2], [0.3, 0.4]])  # Watson axis
    np.testing.assert_array_equal(m[:, 2], 0.3)
    assert np.isnan(m[:, 3:]).all()
    assert resolve_x0_name(noddi, "partial_volume_0") == "partial_volume_0"
    full = x0_matrix(noddi, np.arange(P, dtype=float), 3)
    np.testing.assert_array_equal(full, np.tile(np.arange(P), (3, 1)))
    # a layout of a subset (a dictionary's) is honoured, and the name rule still holds
    layout = ParameterLayout.from_cardinality({
        "SD1WatsonDistributed_1_SD1Watson_1_mu": 2,
        "SD1WatsonDistributed_1_SD1Watson_1_odi": 1})
    sub = x0_matrix(noddi, {"C1Stick_1_mu": [1.0, 2.0]}, 1, layout)
    np.testing.assert_array_equal(sub, [[1.0, 2.0, np.nan]])
    for bad, needle in (({"nothing": 1.0}, "nothing"), ({"odi": [1.0, 2.0, 3.0]}, "odi"),
                        (np.zeros(P + 1), "length"), (np.zeros((4, P)), "rows"),
                        ({"partial_volume_0": "x"}, "partial_volume_0")):
        with pytest.raises(InputError, match=needle):
            x0_matrix(noddi, bad, 2)


def test_simplex_projection_is_constrained_least_squares():
    """The fractions of the classical solvers (dmipy's problem: b0-normalised signals,
    fractions summing to one within their bounds) are the exact constrained optimum."""
    from scipy.optimize import minimize

    from fingerprint.fitting.nonlinear import _simplex_batch

    rng = np.random.default_rng(5)
    for k in (2, 3):
        a = rng.random((6, k, 15))
        y = rng.random((6, 15)) * 0.8
        lower = np.full(k, 0.01)
        got = _simplex_batch(a, y, lower)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
        assert (got >= lower - 1e-12).all()
        for i in range(6):
            def cost(f, ai=a[i], yi=y[i]):
                return float(np.sum((f @ ai - yi) ** 2))
            ref = minimize(cost, np.full(k, 1.0 / k), method="SLSQP",
                           bounds=[(0.01, 1.0)] * k,
                           constraints=[{"type": "eq", "fun": lambda f: f.sum() - 1.0}],
                           options={"ftol": 1e-14, "maxiter": 500})
            assert cost(got[i]) <= ref.fun + 1e-10
        # the brute-force grid's costs are the same optimum (no lower bounds there)
        free = _simplex_batch(a, y)
        costs = projected_costs(a[:, None], y, sum_to_one=True)
        np.testing.assert_allclose(costs[:, 0],
                                   np.sum((np.einsum("rk,rkn->rn", free, a) - y) ** 2, 1),
                                   rtol=1e-8, atol=1e-12)


def test_classical_fit_is_at_least_as_good_as_the_truth_on_noisy_data(hcp):
    """On noisy NODDI signals the fitted cost (dmipy's objective: b0-normalised signals,
    fractions summing to one) is not above the cost at the true parameters, nor above
    that of a refinement started from the truth."""
    from fingerprint.fitting.nonlinear import refine_nonlinear
    from fingerprint.phantoms import add_rician_noise

    _, scheme, signals, _ = hcp
    model = noddi_watson()
    truth = signals["NODDIWatson/params"][:8]
    rng = np.random.default_rng(2)
    data = add_rician_noise(100.0 * model.simulate_signal(scheme, truth), 100.0 / 30, rng)
    b0 = np.asarray(scheme.b0_mask)
    y = data / data[:, b0].mean(axis=1, keepdims=True)

    def cost(x):
        return 0.5 * np.sum((model.simulate_signal(scheme, x) - y) ** 2, axis=1)

    _, from_truth = refine_nonlinear(model, scheme, y, truth, return_cost=True,
                                     sum_to_one=True, max_nfev=300)
    for solver in ("brute2fine", "mix"):
        fitted = model.fit(scheme, data, solver=solver).fitted_parameters_vector
        c = cost(fitted)
        assert np.all(c <= cost(truth) + 1e-12), solver
        assert np.all(c <= from_truth * (1 + 1e-6) + 1e-12), solver


@pytest.mark.parametrize("solver", ["brute2fine", "mix"])
def test_spherical_mean_model_fitted_by_classical_solvers(hcp, solver):
    """smt_noddi (stick + tortuous zeppelin on per-shell spherical means): noise-free
    data are fitted back (fractions within 0.01, the diffusivity within 2 %) with a cost
    not above the truth's; with noise, the fitted cost is not above the truth's either."""
    from fingerprint.models import get_model

    _, scheme, _, _ = hcp
    model = get_model("smt_noddi")
    assert model.is_spherical_mean
    rng = np.random.default_rng(11)
    n = 6
    f0 = rng.uniform(0.2, 0.8, n)
    truth = np.stack([rng.uniform(1.2e-9, 2.6e-9, n), f0, 1.0 - f0], axis=1)
    shells = np.asarray(scheme.shell_indices)
    data = model.simulate_signal(scheme, truth)[:, shells]  # isotropic voxels
    fitted = model.fit(scheme, data, solver=solver)
    assert fitted.solver == solver
    est = fitted.fitted_parameters_vector
    np.testing.assert_allclose(est[:, 0], truth[:, 0], rtol=0.02)
    np.testing.assert_allclose(est[:, 1:], truth[:, 1:], atol=0.01)
    # the truth's cost is 0 on noise-free data
    assert np.all(fitted.residual_sum_of_squares(data) <= 1e-12)
    # noisy shell means: no worse than the truth on the fitted objective
    noisy = data + rng.normal(0.0, 0.01, data.shape)
    noisy[:, np.asarray(scheme.b0_mask)] = 1.0
    est = model.fit(scheme, noisy, solver=solver).fitted_parameters_vector
    means = np.stack([noisy[:, shells == s].mean(axis=1)
                      for s in range(len(scheme.shell_bvalues))], axis=1)

    def rss(x):
        return np.sum((model.simulate_signal(scheme, x) - means) ** 2, axis=1)

    assert np.all(rss(est) <= rss(truth) + 1e-12)
    np.testing.assert_allclose(est[:, 1:], truth[:, 1:], atol=0.05)


@pytest.mark.parametrize("solver", ["brute2fine", "mix"])
def test_per_voxel_fixed_parameters_held_by_classical_solvers(hcp, solver):
    """fixed_parameters (dmipy's set_fixed_parameter with an array): a different value in
    every voxel, held exactly, the other parameters recovered; a fixed fraction turns the
    projection off and still fits; dictionary matching refuses them with the reason."""
    _, scheme, signals, _ = hcp
    data = signals["NODDIWatson/signals_exact"][:4].reshape(2, 2, -1)
    truth = signals["NODDIWatson/params"][:4]
    noddi = noddi_watson()
    spatial = truth.reshape(2, 2, -1)
    fixed = {"odi": spatial[..., 2], "partial_volume_0": spatial[..., 4]}
    fitted = noddi.fit(scheme, data, solver=solver, fixed_parameters=fixed)
    est = fitted.fitted_parameters_vector.reshape(4, -1)
    np.testing.assert_array_equal(est[:, 2], truth[:, 2])
    np.testing.assert_array_equal(est[:, 4], truth[:, 4])
    _check_recovery(noddi, fitted, truth)
    # an orientation fixed per voxel (Ball-Stick: the stick's axis)
    bs_truth = signals["BallStick/params"][:3]
    bs = ball_stick().fit(scheme, signals["BallStick/signals"][:3], solver=solver,
                          fixed_parameters={"C1Stick_1_mu": bs_truth[:, 1:3]})
    np.testing.assert_array_equal(bs.fitted_parameters_vector[:, 1:3], bs_truth[:, 1:3])
    _check_recovery(ball_stick(), bs, bs_truth)


def test_per_voxel_fixed_parameters_errors(hcp):
    _, scheme, signals, _ = hcp
    data = signals["BallStick/signals"][:3]
    model = ball_stick()
    with pytest.raises(InputError, match="brute2fine.*mix"):
        model.fit(scheme, data, fixed_parameters={"lambda_iso": np.full(3, 3e-9)})
    bad = {"G1Ball_1_lambda_iso": np.array([3e-9, np.nan, 3e-9])}
    with pytest.raises(InputError, match="lambda_iso.*every voxel"):
        model.fit(scheme, data, solver="brute2fine", fixed_parameters=bad)
    with pytest.raises(InputError, match="lambda_iso.*within"):
        model.fit(scheme, data, solver="mix", fixed_parameters={"lambda_iso": 1.0})
    with pytest.raises(InputError, match="fixed_parameters 'nothing'"):
        model.fit(scheme, data, solver="mix", fixed_parameters={"nothing": 1.0})
    with pytest.raises(InputError, match="shape"):
        model.fit(scheme, data, solver="mix", fixed_parameters={"lambda_iso": np.ones(5)})
