"""``mc_csd`` as a named volume model: fit_volume / ``fingerprint fit --model mc_csd``,
MRtrix3-convention outputs (FOD SH in the scanner frame, sh2peaks layout, tissue maps,
response files), scheme refusals."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy.special import eval_legendre

from fingerprint.cli.main import main
from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
from fingerprint.errors import InputError
from fingerprint.fitting.csd_volume import (
    fsl_to_scanner_directions,
    read_mrtrix_response,
    responses_from_files,
    write_mrtrix_response,
)
from fingerprint.fitting.directions import default_responses
from fingerprint.fitting.pipeline import check_fsl_scheme, fit_volume, read_fsl_scheme
from fingerprint.utils.spherical_convolution import mrtrix3_sh_basis
from fingerprint.volume_models import VOLUME_MODELS, is_volume_model

SCHEME = wu_minn_hcp_acquisition_scheme()
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # positive determinant: FSL x is flipped
SHAPE = (6, 4, 3)


def _fibre(u):
    cos2 = (SCHEME.gradient_directions @ u) ** 2
    b = SCHEME.bvalues
    return 0.6 * np.exp(-b * 1.7e-9 * cos2) + 0.4 * np.exp(-b * (0.5e-9 + 1.2e-9 * cos2))


def _phantom(tmp_path, single_shell=False):
    """Columns x = 0, 1: white matter (fibres along x, y, z, oblique), x = 2: 90°
    crossings (b-vector frame), x = 3: grey matter, x = 4: CSF, x = 5: half white
    matter / half CSF. Returns paths and the per-voxel fibre directions (b-vector
    frame)."""
    rng = np.random.default_rng(5)
    n = SCHEME.number_of_measurements
    data = np.zeros(SHAPE + (n,))
    fibres: dict[tuple[int, int, int], list[np.ndarray]] = {}
    axes = [np.array(v, float) / np.linalg.norm(v) for v in
            ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0.5])]
    b = SCHEME.bvalues
    for idx in np.ndindex(SHAPE):
        x, y, _ = idx
        if x in (0, 1):
            u = axes[(y + x) % 4]
            s, fibres[idx] = 1000 * _fibre(u), [u]
        elif x == 2:
            u1 = axes[y % 4]
            t = np.cross(u1, [0.3, 0.5, 0.8])
            u2 = t / np.linalg.norm(t)
            s, fibres[idx] = 500 * (_fibre(u1) + _fibre(u2)), [u1, u2]
        elif x == 3:
            s = 1200 * np.exp(-b * 0.8e-9)
        elif x == 4:
            s = 2500 * np.exp(-b * 3e-9)
        else:
            s, fibres[idx] = 500 * _fibre(axes[0]) + 1250 * np.exp(-b * 3e-9), [axes[0]]
        data[idx] = np.abs(s + rng.normal(scale=2.0, size=n))
    keep = np.ones(n, bool)
    if single_shell:
        keep = (b < 10e6) | (np.abs(b - 2e9) < 1e8)
    dwi = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(data[..., keep].astype(np.float32), AFFINE), dwi)
    bval, bvec = tmp_path / "dwi.bval", tmp_path / "dwi.bvec"
    np.savetxt(bval, (b[keep] / 1e6)[None], fmt="%g")
    np.savetxt(bvec, SCHEME.gradient_directions[keep].T, fmt="%.8f")
    return dwi, bval, bvec, fibres


def _load(path):
    return np.asarray(nib.load(path).dataobj)


def test_mc_csd_is_a_volume_model():
    assert is_volume_model("mc_csd") and is_volume_model("MC-CSD")
    assert not is_volume_model("noddi")
    info = VOLUME_MODELS["mc_csd"]
    assert {"fod", "peaks", "npeaks", "wm", "gm", "csf"} <= set(info.outputs)
    assert info.options["sh_order"][0] == 8 and info.reference


def test_fsl_to_scanner_directions():
    g = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    np.testing.assert_allclose(fsl_to_scanner_directions(g, AFFINE), [[-1, 0, 0],
                                                                      [0, 0.6, 0.8]])
    # negative determinant (radiological storage): no flip, rotation applied
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]) * 1.5
    aff = np.eye(4)
    aff[:3, :3] = rot
    np.testing.assert_allclose(fsl_to_scanner_directions(g, aff),
                               [[0, 1, 0], [-0.6, 0, -0.8]], atol=1e-12)


def test_fit_volume_mc_csd_writes_mrtrix_convention_maps(tmp_path):
    dwi, bval, bvec, fibres = _phantom(tmp_path)
    fractions = []
    result = fit_volume("mc_csd", dwi, bval, bvec, tmp_path / "out", prefix="sub-01",
                        preview=True, chunk_voxels=17, progress=fractions.append)
    assert result.model == "mc_csd" and result.n_voxels == np.prod(SHAPE)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    fod = _load(result.maps["fod"])
    assert fod.shape == SHAPE + (45,)
    side = json.loads(result.maps["fod"].with_name(
        result.maps["fod"].name.replace(".nii.gz", ".json")).read_text())
    assert "MRtrix3" in side["SphericalHarmonics"]["Basis"]
    assert side["SphericalHarmonics"]["MaxOrder"] == 8 and "scanner" in side["Frame"]
    peaks = _load(result.maps["peaks"])
    npeaks = _load(result.maps["npeaks"])
    assert peaks.shape == SHAPE + (9,)
    flip = np.diag([-1.0, 1.0, 1.0])  # FSL -> scanner for this affine
    for idx, us in fibres.items():
        assert npeaks[idx] == len(us), idx
        for k in range(len(us)):
            vec = peaks[idx][3 * k:3 * k + 3]
            amp = np.linalg.norm(vec)
            cos = max(abs(vec @ (flip @ u)) / amp for u in us)
            assert math.degrees(math.acos(min(cos, 1.0))) < 5.0, (idx, k)
            # the vector's norm is the FOD amplitude at the peak (scanner frame SH)
            value = mrtrix3_sh_basis(8, vec[None] / amp)[0] @ fod[idx]
            np.testing.assert_allclose(amp, value, rtol=1e-4)
        assert np.all(np.isnan(peaks[idx][3 * len(us):]))
    wm, gm, csf = (_load(result.maps[t]) for t in ("wm", "gm", "csf"))
    assert np.all(wm[0:2] > 0.85) and np.all(gm[3] > 0.85) and np.all(csf[4] > 0.85)
    assert np.all(wm[3:5] < 0.1)
    np.testing.assert_allclose(_load(result.maps["wm_signalfraction"])[5], 0.5, atol=0.1)
    np.testing.assert_allclose(wm, fod[..., 0] * math.sqrt(4 * math.pi), rtol=1e-5)
    assert np.all(_load(result.maps["r2"]) > 0.85)  # order-8 FODs leave the l >= 10 signal
    names = {p.name for p in result.files}
    assert "sub-01_model-mcCsd_desc-wmresponse.txt" in names
    assert result.preview is not None and result.preview.stat().st_size > 0


def test_mc_csd_with_response_files_and_cli(tmp_path, capsys):
    dwi, bval, bvec, fibres = _phantom(tmp_path)
    r = default_responses(SCHEME)  # attenuation units: scale to the phantom's S0s
    shells = np.asarray(r.shell_bvalues)
    # white matter from the phantom's own kernel, grey matter and CSF exact
    nodes, weights = np.polynomial.legendre.leggauss(64)
    ell = np.arange(0, 9, 2)
    y = np.sqrt((2 * ell + 1) / (4 * np.pi))[:, None] * eval_legendre(ell[:, None], nodes)
    wm = np.stack([1000 * 2 * np.pi * (y * (0.6 * np.exp(-b * 1.7e-9 * nodes ** 2) + 0.4 *
                   np.exp(-b * (0.5e-9 + 1.2e-9 * nodes ** 2))) * weights).sum(1)
                   for b in shells])
    files = [write_mrtrix_response(tmp_path / "wm.txt", wm, shells),
             write_mrtrix_response(tmp_path / "gm.txt",
                                   (1200 * math.sqrt(4 * math.pi) * np.exp(-shells * 0.8e-9))
                                   [:, None], shells),
             write_mrtrix_response(tmp_path / "csf.txt",
                                   (2500 * math.sqrt(4 * math.pi) * np.exp(-shells * 3e-9))
                                   [:, None], shells)]
    rows, stated = read_mrtrix_response(files[0])
    np.testing.assert_allclose(rows, wm, rtol=1e-9)
    np.testing.assert_allclose(stated, shells)
    loaded = responses_from_files(tuple(files), SCHEME)
    assert loaded.isotropic_names == ("gm", "csf")
    out = tmp_path / "cli"
    code = main(["fit", "--model", "mc_csd", "--dwi", str(dwi), "--bval", str(bval),
                 "--bvec", str(bvec), "--out", str(out), "--response", *map(str, files),
                 "--sh-order", "6", "--max-peaks", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mc_csd" in printed and "deconvolution" in printed
    fod = _load(next(out.glob("*param-fod_dwimap.nii.gz")))
    peaks = _load(next(out.glob("*param-peaks_dwimap.nii.gz")))
    assert fod.shape == SHAPE + (28,) and peaks.shape == SHAPE + (6,)
    gm = _load(next(out.glob("*param-gm_dwimap.nii.gz")))
    np.testing.assert_allclose(gm[3], 1.0, atol=0.03)


def test_mc_csd_refuses_single_shell_and_bad_options(tmp_path):
    dwi, bval, bvec, _ = _phantom(tmp_path, single_shell=True)
    with pytest.raises(InputError, match="3 tissues.*2 distinct b-value"):
        fit_volume("mc_csd", dwi, bval, bvec, tmp_path / "out")
    # the check the server runs on an upload (the library's one scheme check)
    with pytest.raises(InputError, match="csd|3 tissues"):
        check_fsl_scheme(read_fsl_scheme(bval, bvec), bval, bvec, "mc_csd")
    dwi, bval, bvec, _ = _phantom(tmp_path)
    with pytest.raises(InputError, match="sh_order"):
        fit_volume("mc_csd", dwi, bval, bvec, tmp_path / "o2", model_options={"sh_order": 7})
    with pytest.raises(InputError, match="unknown mc_csd option"):
        fit_volume("mc_csd", dwi, bval, bvec, tmp_path / "o3", model_options={"lmax": 8})
    with pytest.raises(InputError, match="volume models"):
        fit_volume("noddi", dwi, bval, bvec, tmp_path / "o4", model_options={"sh_order": 8})
    assert main(["fit", "--model", "noddi", "--dwi", str(dwi), "--bval", str(bval), "--bvec",
                 str(bvec), "--out", str(tmp_path / "o5"), "--sh-order", "8"]) != 0


def test_server_job_runs_mc_csd(tmp_path):
    """The server accepts mc_csd (no timing, no dictionary) and its job runner (what its
    worker processes run) writes the same maps through fit_volume."""
    from server.errors import ApiError
    from server.executor import JobSpec, run_job
    from server.validation import check_model, check_timing

    assert check_model("MC-CSD") == "mc_csd"
    check_timing("mc_csd", {})  # no pulse timing needed
    with pytest.raises(ApiError):
        check_model("no_such_model")
    dwi, bval, bvec, fibres = _phantom(tmp_path)
    job_dir = tmp_path / "job"
    (job_dir / "inputs").mkdir(parents=True)
    inputs = {}
    for key, path in (("dwi", dwi), ("bval", bval), ("bvec", bvec)):
        (job_dir / "inputs" / path.name).write_bytes(path.read_bytes())
        inputs[key] = path.name
    spec = JobSpec(job_id="j1", kind="fit", model="mc_csd", options={}, inputs=inputs,
                   job_dir=str(job_dir), db_path=str(tmp_path / "db.sqlite"),
                   dictionary_dir=str(tmp_path / "dictionaries"), threads=1, attempt=1,
                   extra={"dictionary_cache_bytes": 10**9})
    outcome = run_job(spec)
    assert outcome["status"] == "succeeded", outcome
    (fod_path,) = (job_dir / "outputs").glob("*_param-fod_dwimap.nii.gz")
    (npeaks_path,) = (job_dir / "outputs").glob("*_param-npeaks_dwimap.nii.gz")
    assert _load(fod_path).shape == SHAPE + (45,)
    npeaks = _load(npeaks_path)
    for idx, us in fibres.items():
        assert npeaks[idx] == len(us)
    assert not (tmp_path / "dictionaries").exists() or not any(
        (tmp_path / "dictionaries").iterdir())
