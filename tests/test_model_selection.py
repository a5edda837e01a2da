"""Information criteria on fitted models and voxel-wise model comparison."""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import load_reference, noddi_watson

from fingerprint.core.fitted_model import free_parameter_count
from fingerprint.core.modeling_framework import MultiCompartmentModel
from fingerprint.errors import InputError
from fingerprint.fitting.solvers.selection import compare_models
from fingerprint.phantoms import add_rician_noise, random_orientations
from fingerprint.signal_models.cylinder_models import C1Stick
from fingerprint.signal_models.gaussian_models import G1Ball


@pytest.fixture(scope="module")
def scheme(reference_dir):
    return load_reference(reference_dir, "hcp")[1]


def ball_stick() -> MultiCompartmentModel:
    return MultiCompartmentModel(models=[G1Ball(), C1Stick()])


def test_free_parameter_counts():
    bs = ball_stick()
    # lambda_iso, mu (2), lambda_par, one of the two fractions
    assert free_parameter_count(bs) == 5
    bs.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    assert free_parameter_count(bs) == 4
    bs.set_parameter_optimization_bounds("C1Stick_1_lambda_par", [[2e-9, 2e-9]])
    assert free_parameter_count(bs) == 3  # equal bounds: not free
    # NODDI: mu (2), odi, the bundle's intra fraction, one top-level fraction; the
    # tortuous and equal links and the fixed diffusivities are not counted
    assert free_parameter_count(noddi_watson()) == 5
    bss = MultiCompartmentModel(models=[G1Ball(), C1Stick(), C1Stick()])
    assert free_parameter_count(bss) == 1 + 2 * 3 + 2


def test_criteria_values(scheme, reference_dir):
    signals = load_reference(reference_dir, "hcp")[2]
    truth = signals["BallStick/params"][:4]
    model = ball_stick()
    rng = np.random.default_rng(0)
    clean = 200.0 * model.simulate_signal(scheme, truth)
    data = add_rician_noise(clean, 2.0, rng)  # non-negative: every voxel is usable
    fitted = model.fit(scheme, data.reshape(2, 2, -1), solver="brute2fine",
                       mask=np.array([[True, True], [True, False]]))
    data = data.reshape(2, 2, -1)
    rss = fitted.residual_sum_of_squares(data)
    pred = fitted.predict()
    n = scheme.number_of_measurements
    expected = np.sum((data - pred) ** 2, axis=-1)
    np.testing.assert_allclose(rss[fitted.mask], expected[fitted.mask], rtol=1e-9)
    assert rss[1, 1] == 0.0
    # the noise variance is recovered by RSS / n
    assert np.all(np.abs(rss[fitted.mask] / n / 4.0 - 1) < 0.3)
    k = fitted.n_free_parameters
    base = n * np.log(rss[fitted.mask] / n)
    np.testing.assert_allclose(fitted.aic(data)[fitted.mask], base + 2 * k)
    np.testing.assert_allclose(fitted.bic(data)[fitted.mask], base + k * np.log(n))
    np.testing.assert_allclose(fitted.aicc(data)[fitted.mask],
                               base + 2 * k + 2 * k * (k + 1) / (n - k - 1))
    assert fitted.bic(data)[1, 1] == 0.0


def test_simulate_signal_from_fitted_parameters(scheme, reference_dir):
    signals = load_reference(reference_dir, "hcp")[2]
    data = signals["BallStick/signals"][:3]
    model = ball_stick()
    fitted = model.fit(scheme, data, solver="brute2fine")
    from_dict = model.simulate_signal(scheme, fitted.fitted_parameters)
    from_vector = model.simulate_signal(scheme, fitted.fitted_parameters_vector)
    np.testing.assert_allclose(from_dict, from_vector)
    np.testing.assert_allclose(from_dict, data, atol=1e-6)


def _phantom(model, scheme, n, rng):
    mu = random_orientations(n, rng)
    if len(model.parameter_names) == 5 and "odi" in model.parameter_names[1]:
        iso = rng.uniform(0.05, 0.4, n)
        return model.parameters_to_parameter_vector(
            SD1WatsonDistributed_1_SD1Watson_1_mu=mu,
            SD1WatsonDistributed_1_SD1Watson_1_odi=rng.uniform(0.05, 0.5, n),
            SD1WatsonDistributed_1_partial_volume_0=rng.uniform(0.3, 0.8, n),
            partial_volume_0=iso, partial_volume_1=1 - iso)
    f = rng.uniform(0.3, 0.8, n)
    return model.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=rng.uniform(2.0e-9, 3e-9, n), C1Stick_1_mu=mu,
        C1Stick_1_lambda_par=rng.uniform(1.5e-9, 2.5e-9, n), partial_volume_0=1 - f,
        partial_volume_1=f)


def test_bic_picks_the_generating_model_at_snr_30(scheme):
    rng = np.random.default_rng(1)
    models = {"ball_stick": ball_stick(), "noddi": noddi_watson()}
    for i, (name, generator) in enumerate(models.items()):
        x = _phantom(generator, scheme, 60, rng)
        data = add_rician_noise(100.0 * generator.simulate_signal(scheme, x), 100.0 / 30,
                                rng)
        fits = {n: m.fit(scheme, data, solver="brute2fine") for n, m in models.items()}
        comparison = compare_models(fits, data, criterion="bic")
        assert comparison.names == list(models)
        assert comparison.fractions()[name] >= 0.9, (name, comparison.fractions())
        assert np.mean(comparison.winner == i) >= 0.9
        legend = comparison.legend()
        assert legend["values"] == {"0": "ball_stick", "1": "noddi"}
        assert legend["n_free_parameters"] == {"ball_stick": 5, "noddi": 5}


def test_compare_models_errors(scheme, reference_dir):
    signals = load_reference(reference_dir, "hcp")[2]
    data = signals["BallStick/signals"][:2]
    fit = ball_stick().fit(scheme, data, solver="brute2fine", Ns=2, N_sphere_samples=10)
    with pytest.raises(InputError, match="criterion"):
        compare_models([fit, fit], data, criterion="dic")
    with pytest.raises(InputError, match="at least two"):
        compare_models([fit], data)
    other = ball_stick().fit(scheme, data[:1], solver="brute2fine", Ns=2,
                             N_sphere_samples=10)
    with pytest.raises(InputError, match="same data"):
        compare_models({"a": fit, "b": other}, data)
    comparison = compare_models([fit, fit], data, criterion="aic")
    assert np.all(comparison.winner == 0)  # ties go to the first model


def test_compare_command_writes_winner_legend_and_maps(tmp_path):
    import json

    import nibabel as nib

    from fingerprint.cli.main import main
    from fingerprint.phantoms import noddi_phantom, write_phantom

    phantom = noddi_phantom(shape=(4, 3, 2), seed=0, snr=50)
    paths = write_phantom(phantom, tmp_path / "in", prefix="sub-01")
    out = tmp_path / "out"
    code = main(["compare", "--models", "ball_stick", "noddi", "--dwi", str(paths["dwi"]),
                 "--bval", str(paths["bval"]), "--bvec", str(paths["bvec"]), "--mask",
                 str(paths["mask"]), "--out", str(out), "--solver", "brute2fine"])
    assert code == 0
    winner = out / "sub-01_model-comparison_desc-bicWinner_dwimap.nii.gz"
    legend = json.loads(winner.with_name(winner.name[:-7] + ".json").read_text())
    assert legend["values"] == {"0": "ball_stick", "1": "noddi"}
    assert legend["Criterion"] == "BIC" and legend["Solver"] == "brute2fine"
    mask = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    index = np.asarray(nib.load(winner).dataobj)
    assert np.all(index[~mask] == -1)
    assert np.mean(index[mask] == 1) >= 0.75  # the phantom is NODDI (some nearly sticks)
    for model in ("ballStick", "noddi"):
        bic = np.asarray(nib.load(out / f"sub-01_model-{model}_param-bic_dwimap.nii.gz"
                                  ).dataobj)
        assert np.all(np.isfinite(bic[mask])) and np.all(bic[~mask] == 0)
    assert (out / "sub-01_model-comparison_desc-bicWinner_preview.png").stat().st_size > 0
    assert main(["compare", "--models", "noddi", "--dwi", str(paths["dwi"]), "--bval",
                 str(paths["bval"]), "--bvec", str(paths["bvec"]), "--out",
                 str(out)]) == 2
