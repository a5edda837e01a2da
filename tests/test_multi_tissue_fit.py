"""Multi-tissue fingerprint fits: volume fractions from per-tissue S0 responses, given or
estimated from the data's own single-tissue voxels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.errors import InputError
from fingerprint.fitting.multi_tissue import (
    compartment_responses,
    estimate_tissue_responses,
    parse_responses,
    volume_fraction_maps,
)
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.models import get_model, model_name
from fingerprint.phantoms import default_scheme, model_truth

S0_WM, S0_GM, S0_CSF = 1000.0, 1600.0, 4000.0


@pytest.fixture(scope="module")
def scheme():
    return default_scheme(shells=((1000.0, 30), (2000.0, 60), (3000.0, 60)))


def _noddi_voxels(scheme, n, seed, isovf_range=(0.1, 0.9)):
    """NODDI voxels built from tissue volumes: CSF volume v and WM volume 1 - v, whose
    signals scale with their S0 responses; returns data, true volume fraction of CSF."""
    model = get_model("noddi")
    params = model_truth("noddi", n, seed)
    rng = np.random.default_rng(seed)
    v_csf = rng.uniform(*isovf_range, n)
    sig_csf, sig_wm = v_csf * S0_CSF, (1 - v_csf) * S0_WM
    s0 = sig_csf + sig_wm
    names = list(model.parameter_names)
    params[:, names.index("partial_volume_0") + 1] = sig_csf / s0
    params[:, names.index("partial_volume_1") + 1] = sig_wm / s0
    return np.asarray(model.simulate_signal(scheme, params)) * s0[:, None], v_csf


def test_volume_fractions_undo_the_s0_responses(scheme, tmp_path):
    """Noise-free: a NODDI model with given responses (model.fit, dmipy style) reports
    signal fractions as fitted and volume fractions equal to the simulated volumes."""
    data, v_csf = _noddi_voxels(scheme, 40, seed=1)
    model = get_model("noddi", S0_tissue_responses=[S0_CSF, S0_WM])
    assert model_name(model) == "noddi"  # still the named model (its maps, its dictionary)
    fitted = model.fit(scheme, data, dictionary_size=20000, dictionary_dir=tmp_path)
    vf = fitted.fitted_multi_tissue_fractions_normalized
    assert np.mean(np.abs(vf["partial_volume_0"] - v_csf)) < 0.01
    maps = volume_fraction_maps("noddi", fitted.fitted_parameters, [S0_CSF, S0_WM])
    assert set(maps) == {"csf_vf", "wm_vf"}
    np.testing.assert_allclose(maps["csf_vf"], vf["partial_volume_0"])
    np.testing.assert_allclose(maps["csf_vf"] + maps["wm_vf"], 1.0)
    # the signal fraction is not the volume fraction
    assert np.mean(np.abs(fitted.fitted_parameters["partial_volume_0"] - v_csf)) > 0.1


def test_responses_by_tissue_and_errors():
    assert compartment_responses("noddi", {"wm": 1.0, "csf": 3.0, "gm": 2.0}) == (3.0, 1.0)
    assert compartment_responses("activeax", {"wm": 1.0, "csf": 3.0}) == (1.0, 1.0, 3.0)
    assert parse_responses("auto") == "auto"
    assert parse_responses("wm=1,csf=2") == {"wm": 1.0, "csf": 2.0}
    assert parse_responses("3, 4") == [3.0, 4.0]
    with pytest.raises(InputError, match="miss tissue"):
        compartment_responses("noddi", {"wm": 1.0})
    with pytest.raises(InputError, match="2 positive numbers"):
        compartment_responses("noddi", [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="at least two compartments"):
        compartment_responses("watson_stick", [1.0])
    with pytest.raises(InputError, match="multi-tissue responses must be"):
        parse_responses("wm=x")


def _three_tissue_volume(scheme, seed=0):
    """Pure WM (anisotropic sticks + zeppelin), GM (slow isotropic) and CSF voxels plus
    mixed NODDI-like voxels, with per-tissue S0."""
    rng = np.random.default_rng(seed)
    noddi = get_model("noddi")
    wm_params = model_truth("noddi", 300, seed)
    names = list(noddi.parameter_names)
    wm_params[:, names.index("partial_volume_0") + 1] = 0.0
    wm_params[:, names.index("partial_volume_1") + 1] = 1.0
    odi_col = names.index("SD1WatsonDistributed_1_SD1Watson_1_odi") + 1
    wm_params[:, odi_col] = rng.uniform(0.05, 0.15, 300)
    icvf_col = names.index("SD1WatsonDistributed_1_partial_volume_0") + 1
    wm_params[:, icvf_col] = rng.uniform(0.6, 0.8, 300)
    wm = np.asarray(noddi.simulate_signal(scheme, wm_params)) * S0_WM
    b = np.asarray(scheme.bvalues)
    gm = np.exp(-b * 0.8e-9)[None, :] * S0_GM * np.ones((300, 1))
    csf = np.exp(-b * 3e-9)[None, :] * S0_CSF * np.ones((300, 1))
    data = np.concatenate([wm, gm, csf])
    return data * rng.uniform(0.98, 1.02, (data.shape[0], 1))


def test_responses_estimated_from_single_tissue_voxels(scheme):
    est = estimate_tissue_responses(scheme, _three_tissue_volume(scheme))
    assert est["wm"] == pytest.approx(S0_WM, rel=0.05)
    assert est["gm"] == pytest.approx(S0_GM, rel=0.05)
    assert est["csf"] == pytest.approx(S0_CSF, rel=0.05)


def test_cli_multi_tissue_writes_volume_fraction_maps(scheme, tmp_path):
    """`fingerprint fit --multi-tissue wm=..,csf=..` writes csf_vf / wm_vf maps whose
    values are the simulated tissue volumes."""
    data, v_csf = _noddi_voxels(scheme, 24, seed=2)
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(data.reshape(4, 3, 2, -1).astype(np.float32), np.eye(4)),
             src / "sub-01_dwi.nii.gz")
    write_bvals_bvecs(scheme, src / "sub-01_dwi.bval", src / "sub-01_dwi.bvec")
    out = tmp_path / "out"
    code = main(["fit", "--model", "noddi", "--dwi", str(src / "sub-01_dwi.nii.gz"),
                 "--bval", str(src / "sub-01_dwi.bval"), "--bvec",
                 str(src / "sub-01_dwi.bvec"), "--out", str(out), "--dictionary-size",
                 "20000", "--dictionary-dir", str(tmp_path / "dicts"), "--multi-tissue",
                 f"wm={S0_WM},csf={S0_CSF}", "--no-progress"])
    assert code == 0
    path = out / "sub-01_model-noddi_param-csfVf_dwimap.nii.gz"
    got = np.asarray(nib.load(path).dataobj).reshape(-1)
    assert np.mean(np.abs(got - v_csf)) < 0.01
    sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["S0TissueResponses"] == [S0_CSF, S0_WM]
    assert (out / "sub-01_model-noddi_param-wmVf_dwimap.nii.gz").exists()
    assert (out / "sub-01_model-noddi_param-isovf_dwimap.nii.gz").exists()  # signal fraction


def test_multi_tissue_is_a_fit_option_of_volume_fits(scheme, tmp_path):
    """``FitOptions.multi_tissue`` (what server jobs set) gives fit_volume the same maps
    as its ``s0_responses`` argument (what ``fingerprint fit --multi-tissue`` passes);
    model.fit refuses it with a pointer to the dmipy way; bad values name the option."""
    from fingerprint.fitting.multi_tissue import check_responses
    from fingerprint.fitting.options import FitOptions, OptionError
    from fingerprint.fitting.pipeline import fit_volume

    data, v_csf = _noddi_voxels(scheme, 12, seed=3)
    src = tmp_path / "in"
    src.mkdir()
    dwi = src / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data.reshape(3, 2, 2, -1).astype(np.float32), np.eye(4)), dwi)
    write_bvals_bvecs(scheme, src / "sub-01_dwi.bval", src / "sub-01_dwi.bvec")
    kw = {"dictionary_size": 3000, "dictionary_dir": tmp_path / "dicts"}
    by_arg = fit_volume("noddi", dwi, src / "sub-01_dwi.bval", src / "sub-01_dwi.bvec",
                        tmp_path / "a", s0_responses={"wm": S0_WM, "csf": S0_CSF}, **kw)
    opts = FitOptions(multi_tissue=f" WM={S0_WM:g}, csf={S0_CSF:g}")
    assert opts.multi_tissue == "wm=1000,csf=4000"
    by_option = fit_volume("noddi", dwi, src / "sub-01_dwi.bval", src / "sub-01_dwi.bvec",
                           tmp_path / "b", options=opts, **kw)
    for label in ("csf_vf", "wm_vf"):
        a = np.asarray(nib.load(by_arg.maps[label]).dataobj)
        b = np.asarray(nib.load(by_option.maps[label]).dataobj)
        np.testing.assert_array_equal(a, b)
    assert np.mean(np.abs(a.reshape(-1) - (1 - v_csf))) < 0.03  # wm_vf
    with pytest.raises(InputError, match="option 'multi_tissue' is for volume fits"):
        get_model("noddi").fit(scheme, data, multi_tissue="auto", **kw)
    for bad, words in (("wm=1,brain=2", "name each of the tissues"),
                       ("1,0", "positive numbers"), ("", "must be 'auto'")):
        with pytest.raises(OptionError, match=words) as info:
            FitOptions(multi_tissue=bad)
        assert info.value.option == "multi_tissue"
    check_responses("noddi", "auto")
    check_responses("activeax", "wm=1,csf=3")
    with pytest.raises(InputError, match="at least two compartments"):
        check_responses("watson_stick", "auto")
    with pytest.raises(InputError, match="miss tissue"):
        check_responses("noddi", "wm=1,gm=2")
