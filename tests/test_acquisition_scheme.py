"""AcquisitionScheme: dmipy shell grouping, conversions, derived schemes, immutability."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import (
    AcquisitionScheme,
    MeasurementSet,
    acquisition_scheme_from_bvalues,
    acquisition_scheme_from_gradient_strengths,
    acquisition_scheme_from_qvalues,
    b_from_g,
    b_from_q,
    calculate_shell_bvalues_and_indices,
    g_from_b,
    g_from_q,
    gtab_dipy2dmipy,
    gtab_dipy2fingerprint,
    gtab_dmipy2dipy,
    gtab_fingerprint2dipy,
    q_from_b,
    q_from_g,
)
from fingerprint.core.constants import CONSTANTS, GYROMAGNETIC_RATIO
from fingerprint.errors import InputError


def _load(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / "schemes" / f"{name}.json").read_text())


def _from_json(data: dict, **kwargs) -> AcquisitionScheme:
    return acquisition_scheme_from_bvalues(
        np.asarray(data["bvalues_s_per_m2"]), np.asarray(data["gradient_directions"]),
        delta=np.asarray(data["delta_s"]), Delta=np.asarray(data["Delta_s"]),
        TE=None if data.get("TE_s") is None else np.asarray(data["TE_s"]), **kwargs)


def _random_dirs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _small(delta=0.01, Delta=0.03, TE=None) -> AcquisitionScheme:
    b = np.array([0, 1000, 1000, 2000, 2000, 0, 3000]) * 1e6
    return acquisition_scheme_from_bvalues(b, _random_dirs(7), delta=delta, Delta=Delta, TE=TE)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("name", ["hcp", "activeax"])
def test_shell_grouping_matches_dmipy(reference_dir: Path, name: str) -> None:
    data = _load(reference_dir, name)
    scheme = _from_json(data)
    np.testing.assert_array_equal(scheme.shell_indices, data["shell_indices"])
    np.testing.assert_allclose(scheme.shell_bvalues, data["shell_bvalues_s_per_m2"],
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(scheme.qvalues, data["qvalues_per_m"], rtol=1e-10, atol=1e-12)
    assert scheme.number_of_measurements == len(data["bvalues_s_per_m2"])
    # shell_b0_mask and unique_dwi_indices follow from the shell b-values
    shell_b = np.asarray(data["shell_bvalues_s_per_m2"])
    np.testing.assert_array_equal(scheme.shell_b0_mask, shell_b <= 10e6)
    np.testing.assert_array_equal(scheme.unique_dwi_indices, np.flatnonzero(shell_b > 10e6))


def test_activeax_shell_timing(reference_dir: Path) -> None:
    data = _load(reference_dir, "activeax")
    scheme = _from_json(data)
    delta, Delta = np.asarray(data["delta_s"]), np.asarray(data["Delta_s"])
    for s in range(scheme.number_of_shells):
        members = scheme.shell_indices == s
        assert np.all(delta[members] == scheme.shell_delta[s])
        assert np.all(Delta[members] == scheme.shell_Delta[s])
    # a b0 shell per timing group, each with its own timing
    assert scheme.shell_b0_mask.sum() == len(np.unique(delta))


def test_gradient_strengths_follow_the_gyromagnetic_ratio(reference_dir: Path) -> None:
    data = _load(reference_dir, "activeax")
    scheme = _from_json(data)
    q = scheme.gradient_strengths * scheme.delta * GYROMAGNETIC_RATIO / (2 * np.pi)
    np.testing.assert_allclose(q, scheme.qvalues, rtol=1e-12)
    assert CONSTANTS["water_gyromagnetic_ratio"] == GYROMAGNETIC_RATIO


# --------------------------------------------------------------------------- conversions
def test_conversion_functions_analytic() -> None:
    G, delta, Delta = 0.04, 0.01, 0.03
    q = GYROMAGNETIC_RATIO * G * delta / (2 * np.pi)
    b = (Delta - delta / 3) * (2 * np.pi * q) ** 2
    assert q_from_g(G, delta) == pytest.approx(q, rel=1e-14)
    assert b_from_q(q, delta, Delta) == pytest.approx(b, rel=1e-14)
    assert b_from_g(G, delta, Delta) == pytest.approx(b, rel=1e-14)
    assert q_from_b(b, delta, Delta) == pytest.approx(q, rel=1e-14)
    assert g_from_q(q, delta) == pytest.approx(G, rel=1e-14)
    assert g_from_b(b, delta, Delta) == pytest.approx(G, rel=1e-14)
    assert g_from_q(0.0, 0.0) == 0.0


def test_constructors_round_trip() -> None:
    dirs = _random_dirs(6, seed=1)
    G = np.array([0, 0.02, 0.04, 0.06, 0.08, 0.0])
    delta = np.array([0.01, 0.01, 0.012, 0.012, 0.02, 0.02])
    Delta = np.array([0.03, 0.03, 0.035, 0.035, 0.04, 0.04])
    s_g = acquisition_scheme_from_gradient_strengths(G, dirs, delta, Delta)
    s_q = acquisition_scheme_from_qvalues(s_g.qvalues, dirs, delta, Delta)
    s_b = acquisition_scheme_from_bvalues(s_g.bvalues, dirs, delta, Delta)
    for other in (s_q, s_b):
        np.testing.assert_allclose(other.bvalues, s_g.bvalues, rtol=1e-12)
        np.testing.assert_allclose(other.qvalues, s_g.qvalues, rtol=1e-12)
        np.testing.assert_allclose(other.gradient_strengths, G, rtol=1e-12, atol=1e-15)
        assert other.hash == s_g.hash
    np.testing.assert_allclose(s_g.bvalues,
                               (Delta - delta / 3) * (2 * np.pi * s_g.qvalues) ** 2, rtol=1e-14)
    np.testing.assert_allclose(s_g.tau, Delta - delta / 3)


def test_scalar_timing_is_broadcast() -> None:
    a = _small(delta=0.01, Delta=0.03, TE=0.08)
    b = _small(delta=np.full(7, 0.01), Delta=np.full(7, 0.03), TE=np.full(7, 0.08))
    assert a.delta.shape == (7,) and a.TE.shape == (7,)
    assert a.hash == b.hash
    np.testing.assert_array_equal(a.shell_TE, np.full(a.number_of_shells, 0.08))


def test_without_timing_q_and_g_are_none() -> None:
    s = _small(delta=None, Delta=None)
    assert s.qvalues is None and s.gradient_strengths is None and s.tau is None
    assert s.shell_qvalues is None and s.shell_delta is None
    only_delta = _small(delta=0.01, Delta=None)
    assert only_delta.qvalues is None and only_delta.delta is not None


# --------------------------------------------------------------------------- shells
def test_defaults_and_masks() -> None:
    s = _small()
    assert s.b0_threshold == 10e6 and s.min_b_shell_distance == 50e6
    np.testing.assert_array_equal(s.b0_mask, [True, False, False, False, False, True, False])
    assert s.number_of_b0s == 2
    np.testing.assert_array_equal(s.gradient_directions[s.b0_mask], 0.0)
    np.testing.assert_allclose(np.linalg.norm(s.gradient_directions[~s.b0_mask], axis=1), 1.0,
                               rtol=0, atol=1e-15)
    np.testing.assert_array_equal(s.shell_indices, [0, 1, 1, 2, 2, 0, 3])
    np.testing.assert_array_equal(s.shell_bvalues, np.array([0, 1000, 2000, 3000]) * 1e6)
    np.testing.assert_array_equal(s.unique_dwi_indices, [1, 2, 3])
    np.testing.assert_array_equal(s.shell_b0_mask, [True, False, False, False])
    assert len(s) == 7 and s.number_of_shells == 4


def test_single_linkage_clustering() -> None:
    b = np.array([0, 1000, 1040, 1090, 2000, 2050.0, 5]) * 1e6
    idx, shell_b = calculate_shell_bvalues_and_indices(b, 50e6)
    # 1000-1040-1090 chain (each gap <= 50); a gap of exactly 50 still links
    np.testing.assert_array_equal(idx, [0, 1, 1, 1, 2, 2, 0])
    np.testing.assert_allclose(shell_b, [2.5e6, np.mean([1000, 1040, 1090]) * 1e6, 2025e6])
    idx, _ = calculate_shell_bvalues_and_indices(b, 45e6)
    np.testing.assert_array_equal(idx, [0, 1, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("seed", range(5))
def test_clustering_agrees_with_scipy_single_linkage(seed: int) -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(seed)
    b = np.concatenate([rng.uniform(0, 20e6, 5), rng.choice([1e9, 2e9, 3e9], 40)
                        + rng.normal(0, 30e6, 40), rng.uniform(0, 4e9, 10)])
    idx, shell_b = calculate_shell_bvalues_and_indices(b, 50e6)
    clusters = fcluster(linkage(b[:, None], method="single"), 50e6, criterion="distance")
    # same partition ...
    pairs = idx[:, None] == idx[None, :]
    np.testing.assert_array_equal(pairs, clusters[:, None] == clusters[None, :])
    # ... numbered by increasing mean b-value
    assert np.all(np.diff(shell_b) > 0)
    for s, value in enumerate(shell_b):
        assert value == pytest.approx(b[idx == s].mean(), rel=1e-15)


def test_same_b_different_timing_are_different_shells() -> None:
    b = np.array([0, 1000, 1000, 0]) * 1e6
    s = acquisition_scheme_from_bvalues(b, _random_dirs(4), delta=0.01,
                                        Delta=np.array([0.03, 0.03, 0.05, 0.05]))
    np.testing.assert_array_equal(s.shell_indices, [0, 1, 3, 2])
    np.testing.assert_array_equal(s.shell_Delta, [0.03, 0.03, 0.05, 0.05])


def test_echo_time_groups_shells_and_warns_without_b0(caplog) -> None:
    b = np.array([0, 1000, 1000]) * 1e6
    with caplog.at_level(logging.WARNING):
        s = acquisition_scheme_from_bvalues(b, _random_dirs(3), delta=0.01, Delta=0.03,
                                            TE=np.array([0.06, 0.06, 0.09]))
    assert s.number_of_shells == 3
    assert "no b0 measurement for echo time" in caplog.text


def test_single_measurement_scheme() -> None:
    s = acquisition_scheme_from_bvalues(np.array([1e9]), np.array([[0, 0, 1.0]]), 0.01, 0.03)
    np.testing.assert_array_equal(s.shell_indices, [0])
    np.testing.assert_array_equal(s.shell_bvalues, [1e9])
    np.testing.assert_array_equal(s.shell_b0_mask, [False])


# --------------------------------------------------------------------------- measurement sets
def test_measurement_views(reference_dir: Path) -> None:
    s = _from_json(_load(reference_dir, "activeax"))
    m = s.measurements
    assert isinstance(m, MeasurementSet) and len(m) == s.number_of_measurements
    np.testing.assert_array_equal(m.b, s.bvalues)
    np.testing.assert_array_equal(m.directions, s.gradient_directions)
    np.testing.assert_array_equal(m.G, s.gradient_strengths)

    unique, inverse = s.unique_measurements()
    # four timing groups, each with one b0 and one DWI b-value
    assert unique.number_of_measurements == 8
    np.testing.assert_array_equal(unique.b[inverse], s.bvalues)
    np.testing.assert_array_equal(unique.delta[inverse], s.delta)
    np.testing.assert_array_equal(unique.Delta[inverse], s.Delta)
    np.testing.assert_array_equal(unique.q[inverse], s.qvalues)
    np.testing.assert_array_equal(unique.directions, 0.0)

    shells = s.shell_measurements()
    np.testing.assert_array_equal(shells.b, s.shell_bvalues)
    np.testing.assert_array_equal(shells.q, s.shell_qvalues)
    np.testing.assert_array_equal(shells.delta, s.shell_delta)
    np.testing.assert_array_equal(shells.Delta, s.shell_Delta)
    assert shells.directions.shape == (s.number_of_shells, 3)
    np.testing.assert_allclose(shells.tau, s.shell_Delta - s.shell_delta / 3)


def test_unique_measurements_without_timing() -> None:
    s = _small(delta=None, Delta=None)
    unique, inverse = s.unique_measurements()
    np.testing.assert_array_equal(unique.b, np.array([0, 1000, 2000, 3000]) * 1e6)
    assert unique.q is None and unique.delta is None
    np.testing.assert_array_equal(inverse, [0, 1, 1, 2, 2, 0, 3])


def test_measurement_set_validation() -> None:
    with pytest.raises(InputError, match="q"):
        MeasurementSet(b=np.zeros(3), q=np.zeros(2), G=None, delta=None, Delta=None,
                       directions=np.zeros((3, 3)))
    with pytest.raises(InputError, match="directions"):
        MeasurementSet(b=np.zeros(3), q=None, G=None, delta=None, Delta=None,
                       directions=np.zeros((2, 3)))


# --------------------------------------------------------------------------- derived schemes
def test_subset_and_getitem() -> None:
    s = _small()
    mask = np.array([True, False, False, True, True, False, False])
    sub = s.subset(mask)
    assert sub.number_of_measurements == 3
    np.testing.assert_array_equal(sub.bvalues, s.bvalues[mask])
    np.testing.assert_array_equal(sub.gradient_directions, s.gradient_directions[mask])
    np.testing.assert_array_equal(sub.qvalues, s.qvalues[mask])
    np.testing.assert_array_equal(sub.shell_indices, [0, 1, 1])  # regrouped
    assert s[mask].hash == sub.hash
    assert s[[0, 3, 4]].hash == sub.hash
    assert s[[-7, -4, -3]].hash == sub.hash
    assert s[0:3].number_of_measurements == 3
    assert s.subset(np.arange(7)).hash == s.hash
    with pytest.raises(InputError, match="mask"):
        s.subset(np.ones(3, dtype=bool))
    with pytest.raises(InputError, match="indices"):
        s.subset([0, 7])
    with pytest.raises(InputError, match="no measurement"):
        s.subset(np.zeros(7, dtype=bool))
    with pytest.raises(InputError, match="dtype"):
        s.subset([0.5, 1.5])


def test_select_shells() -> None:
    s = _small()
    sel = s.select_shells([0, 2])
    np.testing.assert_array_equal(sel.bvalues, np.array([0, 2000, 2000, 0]) * 1e6)
    np.testing.assert_array_equal(sel.shell_bvalues, [0, 2000e6])
    assert s.select_shells(3).number_of_measurements == 1
    data = np.arange(14.0).reshape(2, 7)
    pruned, pruned_data = s.return_pruned_acquisition_scheme([0, 2], data)
    assert pruned.hash == sel.hash
    np.testing.assert_array_equal(pruned_data, data[:, [0, 3, 4, 5]])
    assert s.return_pruned_acquisition_scheme([1]).number_of_measurements == 2
    with pytest.raises(InputError, match="shells 0..3"):
        s.select_shells([4])
    with pytest.raises(InputError, match="shell_ids"):
        s.select_shells([])


def test_rotated() -> None:
    s = _small()
    angle = 0.7
    R = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                  [0, 0, 1.0]])
    r = s.rotated(R)
    np.testing.assert_allclose(r.gradient_directions, s.gradient_directions @ R.T, atol=1e-15)
    np.testing.assert_array_equal(r.gradient_directions[r.b0_mask], 0.0)
    np.testing.assert_array_equal(r.bvalues, s.bvalues)
    np.testing.assert_array_equal(r.shell_indices, s.shell_indices)
    np.testing.assert_array_equal(r.qvalues, s.qvalues)
    assert r.hash != s.hash
    assert s.rotated(np.eye(3)).hash == s.hash
    np.testing.assert_allclose(r.rotated(R.T).gradient_directions, s.gradient_directions,
                               atol=1e-14)
    with pytest.raises(InputError, match="rotation"):
        s.rotated(np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(InputError, match="rotation"):
        s.rotated(2 * np.eye(3))
    with pytest.raises(InputError, match="3x3"):
        s.rotated(np.eye(2))


# --------------------------------------------------------------------------- immutability
def test_arrays_are_read_only_and_attributes_frozen() -> None:
    s = _small(TE=0.08)
    for name in ("bvalues", "gradient_directions", "qvalues", "gradient_strengths", "delta",
                 "Delta", "TE", "b0_mask", "shell_indices", "shell_bvalues", "shell_b0_mask",
                 "shell_qvalues", "shell_delta", "shell_Delta", "unique_dwi_indices", "tau"):
        arr = getattr(s, name)
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[0]
    with pytest.raises(AttributeError, match="immutable"):
        s.bvalues = np.zeros(7)
    with pytest.raises(AttributeError, match="immutable"):
        s.b0_threshold = 0.0
    with pytest.raises(AttributeError, match="immutable"):
        del s.hash
    with pytest.raises(AttributeError):
        s.new_attribute = 1
    m = s.measurements
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.b = np.zeros(7)
    with pytest.raises(ValueError, match="read-only"):
        m.directions[0, 0] = 1.0
    unique, inverse = s.unique_measurements()
    with pytest.raises(ValueError, match="read-only"):
        inverse[0] = 1


def test_inputs_are_copied() -> None:
    b = np.array([0, 1000e6, 2000e6])
    dirs = _random_dirs(3)
    delta = np.full(3, 0.01)
    s = acquisition_scheme_from_bvalues(b, dirs, delta=delta, Delta=0.03)
    before = s.hash
    b[1] = 5e9
    dirs[1] = [1, 0, 0]
    delta[:] = 0.02
    assert s.bvalues[1] == 1000e6 and s.delta[0] == 0.01
    assert s.hash == before


def test_hash_pickle_and_copy() -> None:
    s = _small(TE=0.08)
    assert isinstance(s.hash, str) and len(s.hash) == 64
    assert _small(TE=0.08).hash == s.hash and _small(TE=0.08) == s
    assert _small().hash != s.hash  # TE is part of the content
    assert _small(Delta=0.031, TE=0.08).hash != s.hash
    assert acquisition_scheme_from_bvalues(s.bvalues, s.gradient_directions, 0.01, 0.03, 0.08,
                                           b0_threshold=20e6).hash != s.hash
    # sub-rounding noise does not change the hash
    noisy = acquisition_scheme_from_bvalues(s.bvalues * (1 + 1e-12), s.gradient_directions,
                                            0.01, 0.03, 0.08)
    assert noisy.hash == s.hash
    back = pickle.loads(pickle.dumps(s))
    assert back.hash == s.hash and back == s
    np.testing.assert_array_equal(back.qvalues, s.qvalues)
    assert copy.deepcopy(s) is s and copy.copy(s) is s
    assert len({s, back}) == 1
    assert "7 measurements" in repr(s)


def test_summary_and_print_acquisition_info(caplog) -> None:
    s = _small(TE=0.08)
    text = s.summary()
    assert "total number of measurements: 7" in text
    assert "number of DWI shells: 3" in text
    lines = [line for line in text.splitlines() if line.startswith("3 ")]
    assert lines and "3000.0" in lines[0] and "80.00" in lines[0]
    with caplog.at_level(logging.INFO, logger="fingerprint.core.acquisition_scheme"):
        out = s.print_acquisition_info
    assert out == text and "Acquisition scheme summary" in caplog.text
    assert "N/A" in _small(delta=None, Delta=None).summary()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bvalues": np.array([0, 1e9])}, "3 rows but there are 2"),
        ({"bvalues": np.array([0, np.nan, 1e9])}, "bvalues contains non-finite"),
        ({"bvalues": np.array([0, -1e9, 1e9])}, "bvalues must be zero or positive"),
        ({"bvalues": np.zeros((3, 1))}, "one-dimensional"),
        ({"bvalues": 1e9}, "one-dimensional"),
        ({"bvalues": np.array([])}, "at least one"),
        ({"bvalues": np.array(["a", "b", "c"])}, "numeric"),
        ({"gradient_directions": np.zeros((3, 2))}, r"shape \(N, 3\)"),
        ({"gradient_directions": np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0.0]])},
         "zero vector for diffusion-weighted measurement index 1"),
        ({"gradient_directions": np.array([[1, 0, 0], [0, 0, 2.0], [0, 1, 0.0]])},
         "unit vectors"),
        ({"gradient_directions": np.array([[1, 0, 0], [0, 0, np.nan], [0, 1, 0.0]])},
         "gradient_directions contains non-finite"),
        ({"delta": np.array([0.01, 0.01])}, "delta has 2 values"),
        ({"delta": np.array([0.01, np.nan, 0.01])}, "delta contains non-finite"),
        ({"delta": -0.01}, "delta must be zero or positive"),
        ({"Delta": np.array([0.03, 0.03, 0.003])}, "Delta - delta/3"),
        ({"delta": np.array([0.01, 0.0, 0.01])}, "delta must be positive"),
        ({"TE": np.array([0.1, 0.1])}, "TE has 2 values"),
        ({"delta": np.ones((3, 2))}, "delta must be a scalar or a one-dimensional"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    args = {"bvalues": np.array([0, 1e9, 2e9]),
            "gradient_directions": np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0.0]]),
            "delta": 0.01, "Delta": 0.03}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        acquisition_scheme_from_bvalues(**args)


def test_b0_directions_may_be_anything_low_b_keep_theirs() -> None:
    # b = 0: any vector (NaN too) becomes zero; 0 < b <= b0_threshold keeps its direction
    # (normalised), which the forward models use; the measurement still normalises S0
    s = acquisition_scheme_from_bvalues(np.array([0, 0, 5e6, 5e6, 1e9]),
                                        np.array([[0, 0, 0], [np.nan] * 3, [3, 0, 0],
                                                  [0, 0, 0], [0, 0, 1.0]]))
    np.testing.assert_array_equal(s.gradient_directions[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(s.gradient_directions[2], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(s.b0_mask, [True, True, True, True, False])
    with pytest.raises(InputError, match="non-finite"):
        acquisition_scheme_from_bvalues(np.array([0, 1e9]), np.array([[0, 0, 0], [np.nan] * 3]))
    # nearly-unit DWI directions are renormalised exactly
    s = acquisition_scheme_from_bvalues(np.array([0, 1e9]), np.array([[0, 0, 0],
                                                                     [0, 0, 1.0005]]))
    assert s.gradient_directions[1, 2] == 1.0


def test_qvalue_and_gradient_constructors_need_timing() -> None:
    dirs = _random_dirs(2)
    with pytest.raises(InputError, match="needs both delta and Delta"):
        acquisition_scheme_from_qvalues(np.array([0, 1e4]), dirs, None, 0.03)
    with pytest.raises(InputError, match="needs both delta and Delta"):
        acquisition_scheme_from_gradient_strengths(np.array([0, 0.05]), dirs, 0.01, None)
    with pytest.raises(InputError, match="qvalues must be zero or positive"):
        acquisition_scheme_from_qvalues(np.array([0, -1e4]), dirs, 0.01, 0.03)
    with pytest.raises(InputError, match="gradient_strengths contains non-finite"):
        acquisition_scheme_from_gradient_strengths(np.array([0, np.inf]), dirs, 0.01, 0.03)


def test_threshold_errors() -> None:
    with pytest.raises(InputError, match="b0_threshold"):
        acquisition_scheme_from_bvalues(np.array([0, 1e9]), _random_dirs(2), b0_threshold=-1)
    with pytest.raises(InputError, match="min_b_shell_distance"):
        acquisition_scheme_from_bvalues(np.array([0, 1e9]), _random_dirs(2),
                                        min_b_shell_distance=np.nan)


def test_unit_warnings(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        acquisition_scheme_from_bvalues(np.array([0, 1000, 2000.0]), _random_dirs(3))
    assert "s/mm² given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        acquisition_scheme_from_bvalues(np.array([0, 1e9]), _random_dirs(2), delta=10.0,
                                        Delta=30.0)
    assert "milliseconds given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        acquisition_scheme_from_bvalues(np.array([1e9, 2e9]), _random_dirs(2))
    assert "no b0 measurements" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        acquisition_scheme_from_gradient_strengths(np.array([0, 60.0]), _random_dirs(2),
                                                   0.01, 0.03)
    assert "mT/m given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _small()
    assert caplog.text == ""


# --------------------------------------------------------------------------- store
def test_dictionary_store_round_trip(reference_dir: Path) -> None:
    from fingerprint.dictionary.store import scheme_from_dict, scheme_to_dict

    s = _from_json(_load(reference_dir, "activeax"))
    back = scheme_from_dict(json.loads(json.dumps(scheme_to_dict(s))))
    assert back.hash == s.hash
    np.testing.assert_array_equal(back.shell_indices, s.shell_indices)
    np.testing.assert_allclose(back.qvalues, s.qvalues, rtol=1e-14)


# --------------------------------------------------------------------------- DIPY
def test_dipy_round_trip(reference_dir: Path) -> None:
    pytest.importorskip("dipy")
    from dipy.core.gradients import GradientTable

    s = _from_json(_load(reference_dir, "hcp"))
    gtab = gtab_fingerprint2dipy(s)
    assert isinstance(gtab, GradientTable)
    np.testing.assert_allclose(gtab.bvals, s.bvalues / 1e6)
    assert gtab.big_delta == pytest.approx(s.Delta[0])
    assert gtab.small_delta == pytest.approx(s.delta[0])
    back = gtab_dipy2fingerprint(gtab)
    assert back.hash == s.hash
    np.testing.assert_array_equal(back.shell_indices, s.shell_indices)
    assert gtab_dmipy2dipy is gtab_fingerprint2dipy and gtab_dipy2dmipy is gtab_dipy2fingerprint
    assert s.to_dipy().bvals.shape == (s.number_of_measurements,)


def test_dipy_errors(reference_dir: Path, caplog) -> None:
    pytest.importorskip("dipy")
    from dipy.core.gradients import gradient_table

    with pytest.raises(InputError, match="single delta"):
        gtab_fingerprint2dipy(_from_json(_load(reference_dir, "activeax")))
    with pytest.raises(InputError, match="GradientTable"):
        gtab_dipy2fingerprint(object())
    with pytest.raises(InputError, match="AcquisitionScheme"):
        gtab_fingerprint2dipy(object())
    no_timing = _small(delta=None, Delta=None)
    gtab = gradient_table(np.array(no_timing.bvalues) / 1e6,
                          bvecs=np.array(no_timing.gradient_directions))
    with caplog.at_level(logging.WARNING):
        back = gtab_dipy2fingerprint(gtab)
    assert back.delta is None and "big_delta" in caplog.text
    assert back.hash == no_timing.hash


def test_direct_constructor_checks_consistency() -> None:
    s = _small()
    args = (np.array(s.bvalues), np.array(s.gradient_directions))
    same = AcquisitionScheme(*args, s.qvalues, s.gradient_strengths, s.delta, s.Delta)
    assert same.hash == s.hash
    with pytest.raises(InputError, match="bvalues and qvalues disagree"):
        AcquisitionScheme(*args, s.qvalues * 1.1, None, s.delta, s.Delta)
    with pytest.raises(InputError, match="qvalues and gradient_strengths disagree"):
        AcquisitionScheme(*args, s.qvalues, s.gradient_strengths * 2, s.delta, s.Delta)


def test_dmipy_names(tmp_path: Path) -> None:
    from fingerprint.core.acquisition_scheme import (
        DmipyAcquisitionScheme,
        acquisition_scheme_from_schemefile,
    )

    s = _small(TE=0.08)
    assert isinstance(s, DmipyAcquisitionScheme)
    s.to_schemefile(tmp_path / "a.scheme")
    back = acquisition_scheme_from_schemefile(tmp_path / "a.scheme", b0_threshold=20e6)
    assert back.b0_threshold == 20e6
    np.testing.assert_allclose(back.bvalues, s.bvalues, rtol=1e-12)
