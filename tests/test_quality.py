"""Per-voxel quality flags (fingerprint.fitting.quality): each rule fires on a phantom
built to trigger it and stays quiet on clean voxels; the sigma and orientation-uncertainty
diagnostics mean what they say; fit_volume writes the bit map and counts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fingerprint.fitting.engine import get_estimator
from fingerprint.fitting.quality import FLAGS, chi2_limit, flag_counts, quality_flags
from fingerprint.io.nifti import mu_to_vectors
from fingerprint.models import get_model
from fingerprint.phantoms import (
    add_rician_noise,
    angular_error_deg,
    default_scheme,
    noddi_parameter_vectors,
    noddi_phantom,
    random_orientations,
    write_phantom,
)

SIZE = 20000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = get_model("noddi")
    scheme = default_scheme()
    est = get_estimator(model, scheme, dictionary_size=SIZE,
                        dictionary_dir=tmp_path_factory.mktemp("dict"))
    return model, scheme, est


def _signals(model, scheme, n, *, icvf, odi, isovf, snr, seed):
    rng = np.random.default_rng(seed)
    full = np.ones(n)
    vec = noddi_parameter_vectors(model, icvf=icvf * full, odi=odi * full,
                                  isovf=isovf * full, mu=random_orientations(n, rng))
    clean = model.simulate_signal(scheme, vec) * 1000.0
    return add_rician_noise(clean, 1000.0 / snr if snr else 0.0, rng), vec


def _flags(est, data):
    ve = est.estimate(data)
    return est.quality_flags(ve), ve


def test_clean_voxels_are_not_flagged(setup):
    model, scheme, est = setup
    data, _ = _signals(model, scheme, 300, icvf=0.5, odi=0.3, isovf=0.15, snr=30, seed=1)
    flags, _ = _flags(est, data)
    assert flag_counts(flags)["any"] <= 3  # at most 1%


def test_each_rule_fires_on_its_phantom(setup):
    model, scheme, est = setup
    n = 40
    # invalid: NaN and no positive b=0
    data, _ = _signals(model, scheme, n, icvf=0.5, odi=0.3, isovf=0.15, snr=30, seed=2)
    data[:5, 3] = np.nan
    data[5:10, scheme.b0_mask] = 0.0
    flags, _ = _flags(est, data)
    assert np.all(flags[:10] & FLAGS["invalid"])
    assert not np.any(flags[10:] & FLAGS["invalid"])

    # at a bound: odi below the lowest the dictionary holds (0.02)
    data, _ = _signals(model, scheme, n, icvf=0.5, odi=0.01, isovf=0.1, snr=200, seed=3)
    flags, _ = _flags(est, data)
    assert np.mean(flags & FLAGS["at_bound"] > 0) > 0.6

    # outside the dictionary: diffusion-weighted signals above the b=0 signal (artefact)
    data, _ = _signals(model, scheme, n, icvf=0.5, odi=0.3, isovf=0.15, snr=30, seed=4)
    data[:, ~scheme.b0_mask] = 1300.0 + np.random.default_rng(4).normal(
        0, 30, (n, int((~scheme.b0_mask).sum())))
    flags, _ = _flags(est, data)
    assert np.all(flags & FLAGS["outside_dictionary"])

    # ambiguous: pure free water, where icvf and odi are undefined (any value fits)
    data, _ = _signals(model, scheme, n, icvf=0.5, odi=0.3, isovf=1.0, snr=100, seed=5)
    flags, _ = _flags(est, data)
    assert np.mean(flags & FLAGS["ambiguous"] > 0) > 0.5

    # poor fit: a few corrupted measurements (spikes) in otherwise clean voxels
    data, _ = _signals(model, scheme, n, icvf=0.5, odi=0.3, isovf=0.15, snr=50, seed=6)
    dwi = np.flatnonzero(~scheme.b0_mask)
    data[:, dwi[::9]] *= 2.5
    flags, _ = _flags(est, data)
    assert np.all(flags & FLAGS["poor_fit"])


def test_sigma_and_orientation_uncertainty_are_calibrated(setup):
    model, scheme, est = setup
    data, vec = _signals(model, scheme, 400, icvf=0.6, odi=0.15, isovf=0.1, snr=25, seed=7)
    _, ve = _flags(est, data)
    # noise sd in raw units: 1000 / 25 = 40
    assert np.median(ve.sigma) == pytest.approx(40.0, rel=0.15)
    names = model.parameter_names
    col = next(i for i, n in enumerate(names) if n.endswith("_mu"))
    offs = np.cumsum([0] + [model.parameter_cardinality[n] for n in names])
    start = int(offs[col])
    err = angular_error_deg(mu_to_vectors(ve.parameters[:, start:start + 2]),
                            mu_to_vectors(vec[:, start:start + 2]))
    # the cone angle is the expected RMS axis error (Cramér-Rao): the median error of a
    # two-dimensional Gaussian axis error is 0.83 times its RMS
    ratio = np.median(err) / (0.83 * np.median(ve.orientation_sd))
    assert 0.6 < ratio < 1.6, ratio


def test_rules_by_hand():
    valid = np.array([True, True, True, True, False])
    params = np.array([[0.0, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [np.nan, np.nan]])
    unc = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.0], [0.0, 0.0], [np.nan, np.nan]])
    flags = quality_flags(valid=valid, parameters=params, uncertainty=unc, lower=[0, 0],
                          upper=[1, 1], scalar_columns=[0, 1],
                          match_chi2=np.array([1, 1, 10, 1, np.nan]), n_features=8,
                          fit_chi2=np.array([1, 1, 1, 10, np.nan]), n_fit=96)
    assert flags.tolist() == [FLAGS["at_bound"], FLAGS["ambiguous"],
                              FLAGS["outside_dictionary"], FLAGS["poor_fit"], FLAGS["invalid"]]
    assert chi2_limit(8) == pytest.approx(4.0)
    assert flag_counts(flags)["any"] == 5


def test_fit_volume_writes_quality_sigma_and_orientation_maps(tmp_path):
    ph = noddi_phantom(shape=(4, 3, 2), seed=3, snr=30)
    ph["dwi"][0, 0, 0, 2] = np.nan  # one invalid voxel
    paths = write_phantom(ph, tmp_path / "in", prefix="sub-01")
    from fingerprint.fitting.pipeline import fit_volume

    result = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], tmp_path / "out",
                        mask=paths["mask"], prefix="sub-01", dictionary_size=3000,
                        dictionary_dir=tmp_path / "dict")
    names = {p.name for p in result.files}
    assert "sub-01_model-noddi_desc-quality_dwimap.nii.gz" in names
    assert "sub-01_model-noddi_param-sigma_dwimap.nii.gz" in names
    assert "sub-01_model-noddi_param-orientation_desc-uncertainty_dwimap.nii.gz" in names
    q = nib.load(tmp_path / "out" / "sub-01_model-noddi_desc-quality_dwimap.nii.gz").get_fdata()
    assert int(q[0, 0, 0]) & FLAGS["invalid"]
    side = json.loads((tmp_path / "out" / "sub-01_model-noddi_desc-quality_dwimap.json")
                      .read_text())
    assert side["QualityCounts"] == result.quality_counts
    assert result.quality_counts["invalid"] == 1 and result.quality_counts["total"] == 24
    assert side["QualityFlags"] == dict(FLAGS)
