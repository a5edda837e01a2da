"""The fitting engine end to end: FingerprintEstimator, fit_model / model.fit and the
fitted-model API, on small NODDI dictionaries built into a temporary directory.

Tolerances were set from what 4,096-atom dictionaries achieve (docs/fitting.md has the
benchmark with 100,000 atoms)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fingerprint.core.orientations import angular_error_deg, mu_to_vectors
from fingerprint.dictionary import get_or_build_dictionary
from fingerprint.errors import InputError
from fingerprint.fitting.engine import clear_estimator_cache, fit_model
from fingerprint.fitting.estimator import FingerprintEstimator
from fingerprint.fitting.frame import angles_to_frames, frames_to_angles
from fingerprint.fitting.matcher import Matcher
from fingerprint.io.gradients import read_bvals_bvecs
from fingerprint.models import get_model

SIZE = 4096
ODI, ICVF, PV0, PV1 = 2, 3, 4, 5   # columns of NODDI's parameter vector (mu takes 0, 1)


@pytest.fixture(scope="module")
def scheme(reference_dir):
    d = reference_dir / "schemes"
    return read_bvals_bvecs(d / "hcp.bval", d / "hcp.bvec", delta=0.0106, Delta=0.0431)


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-dictionaries")


@pytest.fixture(scope="module")
def noddi():
    return get_model("noddi")


@pytest.fixture(scope="module")
def dictionary(scheme, dict_dir):
    return get_or_build_dictionary("noddi", scheme, size=SIZE, directory=dict_dir)


@pytest.fixture(scope="module")
def estimator(dictionary):
    return FingerprintEstimator.from_dictionary(dictionary, n_jobs=2)


def phantom(model, scheme, n, seed, snr=None, s0=1000.0):
    """NODDI voxels with random orientations; Rician noise of sigma = s0 / snr."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[v[:, 2] < 0] *= -1
    iso = rng.uniform(0.0, 0.4, n)
    truth = np.column_stack([frames_to_angles(v), rng.uniform(0.05, 0.9, n),
                             rng.uniform(0.2, 0.9, n), iso, 1.0 - iso])
    sig = s0 * np.asarray(model.simulate_signal(scheme, truth))
    if snr:
        sigma = s0 / snr
        sig = np.hypot(sig + rng.normal(0, sigma, sig.shape), rng.normal(0, sigma, sig.shape))
    return truth, sig


def mae(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).mean(axis=0)


def angular_error(params, truth):
    return angular_error_deg(mu_to_vectors(params[:, :2]), mu_to_vectors(truth[:, :2]))


# ------------------------------------------------------------------ accuracy
def test_noiseless_recovery(estimator, noddi, scheme):
    truth, data = phantom(noddi, scheme, 400, seed=1)
    ve = estimator.estimate(data)
    assert ve.valid.all()
    err = mae(ve.parameters[:, [ODI, ICVF, PV0]], truth[:, [ODI, ICVF, PV0]])
    assert err[0] < 0.035 and err[1] < 0.025 and err[2] < 0.02, err
    np.testing.assert_allclose(ve.parameters[:, PV0] + ve.parameters[:, PV1], 1.0, atol=1e-9)
    coherent = truth[:, ODI] < 0.4
    assert np.median(angular_error(ve.parameters[coherent], truth[coherent])) < 1.0
    np.testing.assert_allclose(ve.s0, 1000.0, rtol=1e-9)
    assert np.all(ve.r2 > 0.99)


def test_noisy_recovery(estimator, noddi, scheme):
    truth, data = phantom(noddi, scheme, 1500, seed=2, snr=30)
    ve = estimator.estimate(data)
    err = mae(ve.parameters[:, [ODI, ICVF, PV0]], truth[:, [ODI, ICVF, PV0]])
    assert err[0] < 0.055 and err[1] < 0.035 and err[2] < 0.035, err
    # noise level estimated from the b0 spread
    assert np.median(ve.sigma) == pytest.approx(1000.0 / 30, rel=0.1)
    # the posterior spread is a usable uncertainty: larger errors where it is larger
    unc = ve.uncertainty[:, ODI]
    e = np.abs(ve.parameters[:, ODI] - truth[:, ODI])
    assert e[unc > np.median(unc)].mean() > e[unc <= np.median(unc)].mean()
    assert np.isnan(ve.uncertainty[:, :2]).all()


def test_refinement_and_rician_correction_help(dictionary, noddi, scheme):
    truth, data = phantom(noddi, scheme, 800, seed=3, snr=30)
    cols = [ODI, ICVF, PV0]
    plain = FingerprintEstimator.from_dictionary(dictionary, n_neighbors=1, refine=False,
                                                 rician=False, frame_iterations=0)
    full = FingerprintEstimator.from_dictionary(dictionary)
    e_plain = mae(plain.estimate(data).parameters[:, cols], truth[:, cols])
    e_full = mae(full.estimate(data).parameters[:, cols], truth[:, cols])
    assert np.all(e_full < e_plain), (e_plain, e_full)


def test_axis_alignment_helps_dispersed_voxels(dictionary, noddi, scheme):
    """The second pass (axis fitted with the matched profile, then a new match) lowers
    the angular and odi errors of grey-matter-like voxels (odi 0.3-0.7, SNR 20)."""
    rng = np.random.default_rng(12)
    n = 1500
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    iso = rng.uniform(0.0, 0.25, n)
    truth = np.column_stack([frames_to_angles(v), rng.uniform(0.3, 0.7, n),
                             rng.uniform(0.25, 0.55, n), iso, 1.0 - iso])
    sig = 1000.0 * noddi.simulate_signal(scheme, truth)
    data = np.hypot(sig + rng.normal(0, 50, sig.shape), rng.normal(0, 50, sig.shape))
    one = FingerprintEstimator.from_dictionary(dictionary, align_axis=False).estimate(data)
    two = FingerprintEstimator.from_dictionary(dictionary).estimate(data)
    assert np.median(angular_error(two.parameters, truth)) < \
        0.95 * np.median(angular_error(one.parameters, truth))
    assert mae(two.parameters[:, ODI], truth[:, ODI]) < mae(one.parameters[:, ODI],
                                                            truth[:, ODI])


def test_seeded_and_free_voxels_in_one_batch(estimator, noddi, scheme):
    """Voxels with an orientation in x0 keep it; the others get exactly what they get in
    a batch of their own (the second pass runs on them alone)."""
    truth, data = phantom(noddi, scheme, 40, seed=13, snr=30)
    x0 = np.full((40, 6), np.nan)
    x0[::2, :2] = truth[::2, :2]
    mixed = estimator.estimate(data, x0=x0).parameters
    np.testing.assert_allclose(angles_to_frames(mixed[::2, :2]),
                               angles_to_frames(truth[::2, :2]), atol=1e-9)
    alone = estimator.estimate(data[1::2]).parameters
    np.testing.assert_allclose(mixed[1::2], alone, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ fitted model API
def test_fit_returns_dmipy_fitted_model(noddi, scheme, dict_dir):
    truth, data = phantom(noddi, scheme, 60, seed=4, snr=50)
    fitted = noddi.fit(scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir)
    fp = fitted.fitted_parameters
    assert list(fp) == list(noddi.parameter_names)
    assert fp["SD1WatsonDistributed_1_SD1Watson_1_mu"].shape == (60, 2)
    np.testing.assert_array_equal(fp["SD1Watson_1_odi"],
                                  fp["SD1WatsonDistributed_1_SD1Watson_1_odi"])
    np.testing.assert_array_equal(fp["odi"], fp["SD1Watson_1_odi"])
    assert "SD1Watson_1_odi" in fp
    with pytest.raises(KeyError, match="ambiguous"):
        fp["volume_0"]
    assert fitted.fitted_parameters_vector.shape == (60, 6)
    assert fitted.uncertainty.shape == (60, 6)
    np.testing.assert_allclose(fitted.S0, data[:, scheme.b0_mask].mean(axis=1))
    assert fitted.mask.all()


def test_predict_r2_mse_consistent(noddi, scheme, dict_dir):
    truth, data = phantom(noddi, scheme, 50, seed=5, snr=40)
    fitted = fit_model(noddi, scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir)
    pred = fitted.predict()
    assert pred.shape == data.shape
    np.testing.assert_allclose(pred / fitted.S0[:, None],
                               fitted.predict(S0=1.0), rtol=1e-10)
    y = data / fitted.S0[:, None]
    yhat = fitted.predict(S0=1.0)
    mse = fitted.mean_squared_error(data)
    np.testing.assert_allclose(mse, np.mean((y - yhat) ** 2, axis=1), rtol=1e-10)
    r2 = fitted.R2_coefficient_of_determination(data)
    tot = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)
    np.testing.assert_allclose(r2, 1 - mse * y.shape[1] / tot, rtol=1e-10)
    assert np.all(r2 > 0.9)
    # the estimator's own goodness of fit (from the matched features) agrees
    np.testing.assert_allclose(fitted.r2_estimate, r2, atol=0.02)


def test_volume_input_and_mask(noddi, scheme, dict_dir):
    truth, data = phantom(noddi, scheme, 24, seed=6, snr=40)
    vol = data.reshape(2, 3, 4, -1)
    mask = np.ones((2, 3, 4), dtype=bool)
    mask[0, 0, :] = False
    fitted = noddi.fit(scheme, vol, mask=mask, dictionary_size=SIZE, dictionary_dir=dict_dir)
    odi = fitted.fitted_parameters["odi"]
    assert odi.shape == (2, 3, 4)
    assert fitted.fitted_parameters["mu"].shape == (2, 3, 4, 2)
    assert np.all(odi[0, 0] == 0) and np.all(fitted.S0[0, 0] == 0)
    assert np.all(odi[mask] > 0)
    flat = noddi.fit(scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir)
    np.testing.assert_allclose(fitted.fitted_parameters_vector[mask],
                               flat.fitted_parameters_vector[mask.ravel()], rtol=1e-12)
    assert fitted.predict().shape == vol.shape
    assert fitted.R2_coefficient_of_determination(vol).shape == (2, 3, 4)


def test_invalid_voxels_are_masked_without_affecting_others(estimator, noddi, scheme,
                                                           caplog):
    truth, data = phantom(noddi, scheme, 20, seed=7, snr=30)
    bad = data.copy()
    bad[3, 10] = np.nan
    bad[5] = 0.0
    bad[7, np.asarray(scheme.b0_mask)] = 0.0
    bad[9, 0] = np.inf
    with caplog.at_level(logging.WARNING):
        ve = estimator.estimate(bad)
    invalid = np.zeros(20, dtype=bool)
    invalid[[3, 5, 7, 9]] = True
    np.testing.assert_array_equal(ve.valid, ~invalid)
    assert np.isnan(ve.parameters[invalid]).all() and np.isnan(ve.s0[invalid]).all()
    assert "4 of 20 voxels" in caplog.text
    good = estimator.estimate(data[~invalid])
    np.testing.assert_allclose(ve.parameters[~invalid], good.parameters, rtol=1e-12)
    # through fit_model with an explicit mask: NaN inside the mask, flagged invalid
    fitted = fit_model(estimator.model, scheme, bad, mask=np.ones(20, bool),
                       dictionary_size=SIZE, dictionary_dir=estimator.dictionary.path.parent)
    assert np.isnan(fitted.fitted_parameters["odi"][invalid]).all()
    np.testing.assert_array_equal(fitted.valid, ~invalid)


def test_x0_seeds_orientation(estimator, noddi, scheme):
    truth, data = phantom(noddi, scheme, 30, seed=8, snr=30)
    ve = estimator.estimate(data, x0={"mu": truth[:, :2]})
    np.testing.assert_allclose(angles_to_frames(ve.parameters[:, :2]),
                               angles_to_frames(truth[:, :2]), atol=1e-9)
    # a full vector with NaN for what should be estimated, broadcast to every voxel
    x0 = np.full(6, np.nan)
    x0[:2] = [0.0, 0.0]
    ve2 = estimator.estimate(data, x0=x0)
    np.testing.assert_allclose(ve2.parameters[:, :2], 0.0, atol=1e-12)
    with pytest.raises(InputError):
        estimator.estimate(data, x0=np.zeros(4))
    with pytest.raises(InputError):
        estimator.estimate(data, x0={"not_a_parameter": 1.0})


def test_x0_vector_through_fit(noddi, scheme, dict_dir):
    truth, data = phantom(noddi, scheme, 12, seed=9, snr=30)
    vol = data.reshape(3, 4, -1)
    x0 = np.full((3, 4, 6), np.nan)
    x0[..., :2] = truth[:, :2].reshape(3, 4, 2)
    fitted = noddi.fit(scheme, vol, x0_vector=x0, dictionary_size=SIZE,
                       dictionary_dir=dict_dir)
    got = angles_to_frames(fitted.fitted_parameters["mu"].reshape(-1, 2))
    want = angles_to_frames(truth[:, :2])
    assert np.all(np.abs(np.sum(got * want, axis=1)) > 1 - 1e-9)


# ------------------------------------------------------------------ matcher
def test_hnsw_recall_against_exact(estimator, dictionary, noddi, scheme):
    feats = dictionary.read_features()
    truth, data = phantom(noddi, scheme, 1000, seed=10, snr=30)
    yn = data / data[:, scheme.b0_mask].mean(axis=1, keepdims=True)
    q = estimator.feature_map.voxel_features(yn, estimator.frame_estimator.estimate(yn))
    exact = Matcher(feats, method="exact")
    hnsw = Matcher(feats, method="auto", hnsw_threshold=1000)
    assert exact.method == "exact" and hnsw.method == "hnsw"
    k = 32
    _, ie = exact.search(q, k)
    _, ih = hnsw.search(q, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ie, ih, strict=True)])
    assert recall >= 0.99


def test_hnsw_index_cached_beside_dictionary(dictionary, caplog):
    cache = dictionary.path.parent / f"{dictionary.path.name}.hnsw16.faiss"
    if cache.exists():
        cache.unlink()
    a = FingerprintEstimator.from_dictionary(dictionary, matcher_method="hnsw")
    assert cache.exists() and a.matcher.method == "hnsw"
    mtime = cache.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="fingerprint.fitting.matcher"):
        b = FingerprintEstimator.from_dictionary(dictionary, matcher_method="hnsw")
    assert "using cached HNSW index" in caplog.text
    assert cache.stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(cache.parent) if p.endswith(".tmp")]
    q = dictionary.read_features(0, 50)
    np.testing.assert_array_equal(a.matcher.search(q, 8)[1], b.matcher.search(q, 8)[1])


def test_approximate_estimator_reads_no_hnsw_graph(dictionary, noddi, scheme, estimator):
    """On an HNSW-sized dictionary (threshold lowered), the estimator's searches (the
    profile match, the main match, the dictionary-spacing estimate) all go to the
    inverted file: no graph is built or read. The spacing equals the exact search's, and
    the estimates are close to the exact matcher's."""
    cache = dictionary.path.parent / f"{dictionary.path.name}.hnsw16.faiss"
    if cache.exists():
        cache.unlink()
    approx = FingerprintEstimator.from_dictionary(dictionary, n_jobs=1, hnsw_threshold=1000)
    exact = FingerprintEstimator.from_dictionary(dictionary, n_jobs=1,
                                                 matcher_method="exact")
    assert approx.matcher.method == "hnsw"
    truth, data = phantom(noddi, scheme, 400, seed=21, snr=30)
    a = approx.estimate(data)
    e = exact.estimate(data)
    assert approx.matcher._hnsw is None and not cache.exists()
    assert approx.matcher._ivf is not None
    assert approx.dictionary_spacing2 == pytest.approx(exact.dictionary_spacing2, rel=1e-5)
    err_a = mae(a.parameters[:, ODI:PV0 + 1], truth[:, ODI:PV0 + 1])
    err_e = mae(e.parameters[:, ODI:PV0 + 1], truth[:, ODI:PV0 + 1])
    np.testing.assert_allclose(err_a, err_e, atol=2e-3)


def test_atom_order_of_the_inverted_file_changes_no_estimate(dictionary, noddi, scheme,
                                                            monkeypatch):
    """With an inverted file the estimator reads its atom tables in the file's list order
    (shared by its shallow copies, as the fitting threads make them); the estimates are
    bit-identical to those made with the tables as stored."""
    import copy

    est = FingerprintEstimator.from_dictionary(dictionary, n_jobs=1, hnsw_threshold=1000)
    _, data = phantom(noddi, scheme, 300, seed=22, snr=25)
    a = est.estimate(data)
    order = est.matcher.atom_order
    assert order is not None and est._local_tables.order is order
    assert not np.array_equal(order, np.arange(order.size))
    assert copy.copy(est)._local_tables is est._local_tables
    monkeypatch.setattr(type(est.matcher), "atom_order", property(lambda self: None))
    b = est.estimate(data)
    for field in ("parameters", "uncertainty", "r2", "sigma", "match_chi2", "fit_chi2",
                  "orientation_sd"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


# ------------------------------------------------------------------ other models, threads
def test_spherical_mean_model(scheme, dict_dir):
    smt = get_model("smt_noddi")
    d = get_or_build_dictionary(smt, scheme, size=2048, directory=dict_dir)
    est = FingerprintEstimator.from_dictionary(d)
    assert est.feature_map.kind == "shell_means"
    rng = np.random.default_rng(11)
    n = 200
    names = list(smt.parameter_names)
    truth = np.empty((n, len(names)))
    lo, hi = d.read_parameters().min(axis=0), d.read_parameters().max(axis=0)
    for j in range(len(names)):
        truth[:, j] = rng.uniform(lo[j] + 0.1 * (hi[j] - lo[j]), hi[j] - 0.1 * (hi[j] - lo[j]),
                                  n)
    pv = [j for j, name in enumerate(names) if name.startswith("partial_volume_")]
    if len(pv) == 2:
        truth[:, pv[1]] = 1.0 - truth[:, pv[0]]
    # full-scheme data: every measurement of a shell carries that shell's mean signal
    per_shell = np.asarray(smt.simulate_signal(scheme, truth))
    data = per_shell[:, np.asarray(scheme.shell_indices)] * 500.0
    ve = est.estimate(data)
    assert ve.valid.all()
    spans = hi - lo
    rel = mae(ve.parameters, truth) / spans
    assert np.all(rel < 0.05), rel
    fitted = fit_model(smt, scheme, data, dictionary_size=2048, dictionary_dir=dict_dir)
    assert fitted.predict().shape == (n, len(scheme.shell_bvalues))
    assert np.all(fitted.R2_coefficient_of_determination(data) > 0.99)


def test_concurrent_fits_are_identical(noddi, scheme, dict_dir):
    clear_estimator_cache()
    truth, data = phantom(noddi, scheme, 300, seed=12, snr=30)

    def run(_):
        return fit_model(noddi, scheme, data, dictionary_size=SIZE,
                         dictionary_dir=dict_dir).fitted_parameters_vector

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(4)))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    # batching does not change a voxel's result
    est = FingerprintEstimator.from_dictionary(
        get_or_build_dictionary("noddi", scheme, size=SIZE, directory=dict_dir))
    whole = est.estimate(data).parameters
    parts = np.concatenate([est.estimate(data[i:i + 37]).parameters
                            for i in range(0, 300, 37)])
    np.testing.assert_allclose(parts, whole, rtol=1e-12)


def test_input_errors(estimator, noddi, scheme, dict_dir):
    with pytest.raises(InputError, match="shape"):
        estimator.estimate(np.ones((3, 10)))
    with pytest.raises(InputError, match="solver"):
        fit_model(noddi, scheme, np.ones((2, scheme.number_of_measurements)),
                  solver="levenberg", dictionary_size=SIZE, dictionary_dir=dict_dir)
    with pytest.raises(InputError, match="mask"):
        fit_model(noddi, scheme, np.ones((2, scheme.number_of_measurements)),
                  mask=np.ones(3, bool), dictionary_size=SIZE, dictionary_dir=dict_dir)
    empty = estimator.estimate(np.zeros((0, scheme.number_of_measurements)))
    assert empty.parameters.shape == (0, 6)


def test_dmipy_solver_names_and_options_accepted(noddi, scheme, dict_dir):
    truth, data = phantom(noddi, scheme, 5, seed=13, snr=30)
    # dmipy's optimiser options: used by brute2fine, ignored by dictionary matching
    a = fit_model(noddi, scheme, data, solver="brute2fine", Ns=5, maxiter=300,
                  number_of_processors=1, use_parallel_processing=False)
    assert a.solver == "brute2fine"
    b = fit_model(noddi, scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir)
    c = fit_model(noddi, scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir, Ns=5,
                  maxiter=300, N_sphere_samples=30)
    assert b.solver == c.solver == "fingerprint"
    np.testing.assert_array_equal(b.fitted_parameters_vector, c.fitted_parameters_vector)
    with pytest.raises(InputError, match="not_an_option"):
        fit_model(noddi, scheme, data, dictionary_size=SIZE, dictionary_dir=dict_dir,
                  not_an_option=1)
    with pytest.raises(InputError, match="amico"):
        fit_model(noddi, scheme, data, solver="amico")


def test_noise_from_residual_with_few_b0s(noddi, scheme, dict_dir):
    """With fewer than 4 b0s the noise level comes from the residual of the feature fit."""
    b0 = np.flatnonzero(np.asarray(scheme.b0_mask))
    keep = np.ones(scheme.number_of_measurements, dtype=bool)
    keep[b0[2:]] = False
    sub = scheme.subset(keep)
    d = get_or_build_dictionary("noddi", sub, size=2048, directory=dict_dir)
    est = FingerprintEstimator.from_dictionary(d)
    truth, data = phantom(noddi, sub, 400, seed=14, snr=30)
    ve = est.estimate(data)
    assert ve.valid.all()
    assert np.median(ve.sigma) == pytest.approx(1000.0 / 30, rel=0.3)
    err = mae(ve.parameters[:, [ODI, ICVF, PV0]], truth[:, [ODI, ICVF, PV0]])
    assert err[0] < 0.06 and err[1] < 0.04 and err[2] < 0.04, err
