"""Volume fitting pipeline: NIfTI input, validation, chunked/executor fitting, BIDS output,
cancellation, phantoms."""

from __future__ import annotations

import gzip
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.errors import CancelledError, InputError
from fingerprint.fitting import engine, pipeline
from fingerprint.fitting.pipeline import fit_volume, prefix_from_filename, validate_inputs
from fingerprint.io.nifti import (
    DWIImage,
    bids_map_name,
    load_mask,
    mu_to_vectors,
)
from fingerprint.phantoms import (
    angular_error_deg,
    default_scheme,
    noddi_errors,
    noddi_phantom,
    write_phantom,
)

#: atoms of the test dictionary (small: built in seconds, shared through the session cache)
SIZE = 3000
NODDI_LABELS = ("icvf", "odi", "isovf", "direction")


@pytest.fixture(scope="module")
def phantom():
    return noddi_phantom(shape=(5, 4, 3), seed=3, snr=50, background=1)


@pytest.fixture(scope="module")
def files(phantom, tmp_path_factory) -> dict[str, Path]:
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"), prefix="sub-01")


@pytest.fixture(scope="module")
def fitted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    seen: list[float] = []
    result = fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], out,
                        mask=files["mask"], prefix="sub-01", dictionary_size=SIZE,
                        progress=seen.append, preview=True)
    return result, seen


def _maps(directory: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(directory.glob("*.nii.gz"))}


# ----------------------------------------------------------------------------- end to end
def test_outputs_are_bids_named_with_sidecars(fitted, files):
    result, _ = fitted
    expected = {f"sub-01_model-noddi_param-{label}_dwimap.nii.gz"
                for label in ("icvf", "odi", "isovf", "direction", "s0", "r2")}
    expected |= {f"sub-01_model-noddi_param-{label}_desc-uncertainty_dwimap.nii.gz"
                 for label in ("icvf", "odi", "isovf", "orientation")}
    expected |= {"sub-01_model-noddi_param-sigma_dwimap.nii.gz",
                 "sub-01_model-noddi_desc-quality_dwimap.nii.gz"}
    names = {p.name for p in result.files}
    assert {n for n in names if n.endswith(".nii.gz")} == expected
    assert {n for n in names if n.endswith(".json")} == {
        n.replace(".nii.gz", ".json") for n in expected}
    assert "sub-01_model-noddi_desc-preview.png" in names
    assert all(p.is_absolute() and p.parent == result.out_dir for p in result.files)
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")]  # no temp files
    png = result.preview.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    odi = json.loads((result.out_dir / "sub-01_model-noddi_param-odi_dwimap.json").read_text())
    assert odi["ParameterName"] == "SD1WatsonDistributed_1_SD1Watson_1_odi"
    assert odi["Units"] == "n/a" and odi["Model"]["Name"] == "noddi"
    assert odi["Solver"] == "fingerprint"
    assert "NODDI" in odi["Model"]["Description"] or "Watson" in odi["Model"]["Description"]
    assert odi["GeneratedBy"][0]["Name"] == "fingerprint" and odi["GeneratedBy"][0]["Version"]
    assert odi["Sources"][0] == files["dwi"].name
    direction = json.loads(
        (result.out_dir / "sub-01_model-noddi_param-direction_dwimap.json").read_text())
    assert direction["ParameterName"] == "SD1WatsonDistributed_1_SD1Watson_1_mu"
    assert direction["OrientationEncoding"]["Type"] == "vector"
    s0 = json.loads((result.out_dir / "sub-01_model-noddi_param-s0_dwimap.json").read_text())
    assert s0["ParameterName"] is None and s0["Units"] == "arbitrary"


def test_maps_geometry_values_and_accuracy(fitted, files, phantom):
    result, progress = fitted
    mask = phantom["mask"]
    assert result.n_voxels == int(mask.sum()) and result.n_invalid == 0
    dwi = nib.load(files["dwi"])
    maps = {}
    for label in (*NODDI_LABELS, "s0", "r2"):
        img = nib.load(result.maps[label])
        assert img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, dwi.affine)
        assert img.shape[:3] == dwi.shape[:3]
        maps[label] = np.asarray(img.dataobj)
        assert np.all(maps[label][~mask] == 0), label  # background untouched
    assert maps["direction"].shape == dwi.shape[:3] + (3,)
    np.testing.assert_allclose(np.linalg.norm(maps["direction"][mask], axis=-1), 1, atol=1e-5)
    for label in ("icvf", "odi", "isovf"):
        assert np.all((maps[label][mask] >= 0) & (maps[label][mask] <= 1)), label
    assert np.all(maps["r2"][mask] > 0.9)
    np.testing.assert_allclose(maps["s0"][mask], phantom["s0"], rtol=0.06)
    errors = noddi_errors(maps, phantom["truth"], mask)
    # 3000 atoms at SNR 50 give ~0.03 and ~2-3 degrees (seeds 3-5); bounds leave 2x room
    assert errors["icvf_mae"] < 0.08 and errors["isovf_mae"] < 0.08
    assert errors["odi_mae"] < 0.07 and errors["direction_median_deg"] < 7
    assert progress[0] == 0.0 and progress[-1] == 1.0
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)


def test_chunking_slabs_and_executor_give_identical_maps(fitted, files, tmp_path):
    result, _ = fitted
    reference = _maps(result.out_dir)
    runs = {
        "tiny chunks": dict(chunk_voxels=7),
        "one slice per slab": dict(slab_bytes=1, chunk_voxels=5),
        "thread pool": dict(executor=ThreadPoolExecutor(max_workers=2), chunk_voxels=4),
    }
    for name, kwargs in runs.items():
        out = tmp_path / name.replace(" ", "-")
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], out,
                   mask=files["mask"], prefix="sub-01", dictionary_size=SIZE, **kwargs)
        maps = _maps(out)
        assert maps.keys() == reference.keys(), name
        assert not [p for p in out.iterdir() if p.name.startswith(".")], name  # spool gone
        for key in maps:
            np.testing.assert_array_equal(maps[key], reference[key], err_msg=f"{name}: {key}")
        if "executor" in kwargs:
            kwargs["executor"].shutdown()
            # the estimator shared with the executor's tasks under its dictionary's path
            # is not kept alive after the fit
            assert not [k for k in engine.ESTIMATORS._items if k[0] == "dictionary"]


def test_workers_rebuild_the_estimator_from_the_dictionary_path(fitted, files):
    """What a worker process does: unpickle a fitter (its dictionary path and options),
    open the dictionary, fit -- through the same core as in-process fitting."""
    result, _ = fitted
    phantom_img = DWIImage(files["dwi"])
    mask = load_mask(files["mask"], phantom_img.spatial_shape)
    slab = next(phantom_img.iter_slabs(mask))
    fitter = engine._fitter_from_dictionary(str(result.dictionary), (("n_jobs", 1),), None)
    payload = pickle.dumps(fitter)
    assert len(payload) < 2000  # the path and options, not the dictionary
    key = engine.dictionary_cache_key(str(result.dictionary), {"n_jobs": 1})
    engine.ESTIMATORS.clear()
    rebuilt = pipeline.fit_chunk(pickle.loads(payload), slab.data)
    assert key in engine.ESTIMATORS
    icvf = np.asarray(nib.load(result.maps["icvf"]).dataobj)[tuple(slab.coords.T)]
    col = [i for i, n in enumerate(_vector_names(rebuilt["parameters"].shape[1]))
           if n == "SD1WatsonDistributed_1_partial_volume_0"][0]
    np.testing.assert_array_equal(rebuilt["parameters"][:, col], icvf)


@pytest.mark.slow
def test_process_pool_executor_gives_identical_maps(fitted, files, tmp_path):
    """Chunks fitted in another process (spawned: nothing inherited) from the dictionary
    path give the same maps as in-process fitting."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    result, _ = fitted
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path,
                   mask=files["mask"], prefix="sub-01", dictionary_size=SIZE, executor=pool,
                   chunk_voxels=16)
    ours, reference = _maps(tmp_path), _maps(result.out_dir)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


@pytest.mark.slow
def test_dask_client_executor_gives_identical_maps(fitted, files, tmp_path):
    distributed = pytest.importorskip("distributed")
    result, _ = fitted
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path,
                   mask=files["mask"], prefix="sub-01", dictionary_size=SIZE,
                   executor=client.get_executor(), chunk_voxels=10)
    ours, reference = _maps(tmp_path), _maps(result.out_dir)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def _vector_names(width: int) -> list[str]:
    from fingerprint.models import get_model

    model = get_model("noddi")
    names = []
    for name in model.parameter_names:
        names += [name] * int(model.parameter_cardinality[name])
    assert len(names) == width
    return names


def test_default_mask_skips_empty_background(files, phantom, tmp_path):
    result = fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path,
                        dictionary_size=SIZE)
    assert result.n_voxels == int(phantom["mask"].sum())  # zero-signal border left out
    names = {p.name for p in result.files}
    assert "model-noddi_param-icvf_dwimap.nii.gz" in names  # no prefix by default


def test_partial_mask_and_uncompressed_input(phantom, tmp_path):
    paths = write_phantom(phantom, tmp_path / "in", prefix="sub-02", compress=False)
    assert paths["dwi"].name == "sub-02_dwi.nii"
    img = nib.load(paths["dwi"])
    half = np.zeros(img.shape[:3], np.uint8)
    half[:, :2] = 1
    half &= phantom["mask"]
    nib.save(nib.Nifti1Image(half[..., None], img.affine), tmp_path / "half.nii.gz")  # 4-D x1
    result = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], tmp_path / "out",
                        mask=tmp_path / "half.nii.gz", dictionary_size=SIZE)
    assert result.n_voxels == int(half.sum())
    icvf = np.asarray(nib.load(result.maps["icvf"]).dataobj)
    assert np.all(icvf[half == 0] == 0) and np.all(icvf[half == 1] > 0)
    again = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], tmp_path / "arr",
                       mask=half.astype(bool), dictionary_size=SIZE)  # in-memory mask
    np.testing.assert_array_equal(np.asarray(nib.load(again.maps["icvf"]).dataobj), icvf)
    with pytest.raises(InputError, match="mask array"):
        fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], tmp_path / "bad",
                   mask=np.ones((2, 2, 2), bool))


def test_cancellation_between_chunks_writes_nothing(files, tmp_path):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 4

    with pytest.raises(CancelledError):
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path / "out",
                   mask=files["mask"], dictionary_size=SIZE, chunk_voxels=3,
                   should_cancel=should_cancel)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(CancelledError), ThreadPoolExecutor(2) as pool:
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path / "out2",
                   mask=files["mask"], dictionary_size=SIZE, chunk_voxels=3,
                   executor=pool, should_cancel=lambda: True)


def test_scaled_integer_input_is_read_as_float32(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "int.nii.gz")
    dwi = DWIImage(tmp_path / "int.nii.gz")
    vol = dwi.read_volume(3)
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol, data[..., 3] * 0.5 + 10.0)
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 2, 3] = mask[0, 0, 0] = mask[0, 1, 2] = True
    slabs = list(dwi.iter_slabs(mask, max_bytes=1))  # one slice at a time
    assert [s.start for s in slabs] == [0, 2, 3]
    coords = np.concatenate([s.coords for s in slabs])
    values = np.concatenate([s.data for s in slabs])
    np.testing.assert_allclose(values, data[tuple(coords.T)] * 0.5 + 10.0)
    assert sorted(map(tuple, coords)) == sorted(map(tuple, np.argwhere(mask)))


def test_spooled_gzip_copy_is_identical_and_corruption_names_the_file(tmp_path):
    """A gzip DWI read in several slabs is decompressed once to a temporary copy with the
    same voxels (removed afterwards); a corrupt deflate stream is an InputError naming
    the file, not a crash."""
    rng = np.random.default_rng(4)
    data = rng.uniform(1, 100, (6, 5, 8, 7)).astype(np.float32)
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    dwi = DWIImage(path)
    mask = np.ones(data.shape[:3], bool)
    with dwi.spooled(mask, tmp_path / "spool", max_bytes=1) as copy:
        assert copy is not dwi and copy.n_selected == mask.size
        values = np.concatenate([s.data for s in copy.iter_slabs(mask, max_bytes=1)])
        coords = np.concatenate([s.coords for s in copy.iter_slabs(mask, max_bytes=1)])
    np.testing.assert_array_equal(values, data[tuple(coords.T)])
    assert not any((tmp_path / "spool").iterdir())
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 64] = bytes(64)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="bad.nii.gz"):
        with DWIImage(bad).spooled(mask, tmp_path / "spool", max_bytes=1):
            pass
    assert not any((tmp_path / "spool").iterdir())


# ----------------------------------------------------------------------------- validation
def test_validate_inputs_summary(files, phantom):
    summary = validate_inputs(files["dwi"], files["bval"], files["bvec"], mask=files["mask"])
    assert summary.shape == phantom["dwi"].shape and summary.n_voxels == phantom["mask"].sum()
    assert summary.n_b0 == 6 and summary.shell_bvalues == pytest.approx((0, 1000, 2000))
    assert json.dumps(summary.to_dict())


def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_every_validation_error_names_the_file(files, phantom, tmp_path):
    dwi, bval, bvec, mask = files["dwi"], files["bval"], files["bvec"], files["mask"]
    data = phantom["dwi"]
    bvals = np.loadtxt(bval)
    cases = []
    cases.append(("missing", (tmp_path / "nope.nii.gz", bval, bvec, None), "nope.nii.gz"))
    three_d = _write(tmp_path / "three_d.nii.gz", data[..., 0])
    cases.append(("3-D", (three_d, bval, bvec, None), "three_d.nii.gz"))
    (tmp_path / "text.nii.gz").write_bytes(b"hello world" * 40)
    cases.append(("not NIfTI", (tmp_path / "text.nii.gz", bval, bvec, None), "text.nii.gz"))
    raw = dwi.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases.append(("truncated", (tmp_path / "trunc.nii.gz", bval, bvec, None), "trunc.nii.gz"))
    plain = _write(tmp_path / "plain.nii", data)
    (tmp_path / "plain_trunc.nii").write_bytes(plain.read_bytes()[:-100])
    cases.append(("truncated .nii", (tmp_path / "plain_trunc.nii", bval, bvec, None),
                  "plain_trunc.nii"))
    short = tmp_path / "short.bval"
    short.write_text(" ".join(f"{b:g}" for b in bvals[:-1]))
    cases.append(("bval/bvec lengths", (dwi, short, bvec, None), "short.bval"))
    fewer = _write(tmp_path / "fewer.nii.gz", data[..., :-1])
    cases.append(("volumes vs bval", (fewer, bval, bvec, None), "fewer.nii.gz"))
    si = tmp_path / "si.bval"
    si.write_text(" ".join(f"{b * 1e6:g}" for b in bvals))
    cases.append(("b in s/m²", (dwi, si, bvec, None), "si.bval"))
    nob0 = tmp_path / "nob0.bval"
    nob0.write_text(" ".join(f"{max(b, 1000):g}" for b in bvals))
    vecs = np.loadtxt(bvec)
    vecs[0, np.linalg.norm(vecs, axis=0) == 0] = 1.0
    np.savetxt(tmp_path / "nob0.bvec", vecs)
    cases.append(("no b0", (dwi, nob0, tmp_path / "nob0.bvec", None), "nob0.bval"))
    (tmp_path / "words.bvec").write_text("a b c\n")
    cases.append(("bvec not numbers", (dwi, bval, tmp_path / "words.bvec", None), "words.bvec"))
    small = _write(tmp_path / "small_mask.nii.gz", np.ones((2, 2, 2), np.uint8))
    cases.append(("mask shape", (dwi, bval, bvec, small), "small_mask.nii.gz"))
    empty = _write(tmp_path / "empty_mask.nii.gz", np.zeros(data.shape[:3], np.uint8))
    cases.append(("empty mask", (dwi, bval, bvec, empty), "empty_mask.nii.gz"))
    nan_mask = _write(tmp_path / "nan_mask.nii.gz", np.full(data.shape[:3], np.nan, np.float32))
    cases.append(("NaN mask", (dwi, bval, bvec, nan_mask), "nan_mask.nii.gz"))
    bad = data.copy()
    bad[2, 2, 1, 5] = np.nan
    nan_dwi = _write(tmp_path / "nan_dwi.nii.gz", bad)
    for label, args, name in cases:
        with pytest.raises(InputError) as info:
            validate_inputs(*args)
        assert name in str(info.value), (label, str(info.value))

    # NaN outside the mask is not counted; inside the mask it is counted, and the voxel
    # is left out of the fit (NaN in its maps) instead of stopping it
    outside = data.copy()
    outside[0, 0, 0, :] = np.nan  # background voxel
    ok = _write(tmp_path / "nan_outside.nii.gz", outside)
    assert validate_inputs(ok, bval, bvec, mask=mask).n_nonfinite_voxels == 0
    assert validate_inputs(nan_dwi, bval, bvec, mask=mask).n_nonfinite_voxels == 1
    result = fit_volume("noddi", nan_dwi, bval, bvec, tmp_path / "o", mask=mask,
                        dictionary_size=SIZE)
    assert result.n_unusable == 1
    icvf = np.asarray(nib.load(result.maps["icvf"]).dataobj)
    assert np.isnan(icvf[2, 2, 1])
    assert np.isfinite(icvf[load_mask(mask, icvf.shape)]).sum() == result.n_voxels - 1


def test_argument_errors(files, tmp_path):
    args = ("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path)
    with pytest.raises(InputError, match="nodi"):
        fit_volume("nodi", *args[1:])
    with pytest.raises(InputError, match="prefix"):
        fit_volume(*args, prefix="../evil")
    with pytest.raises(InputError, match="chunk_voxels"):
        fit_volume(*args, chunk_voxels=0)
    with pytest.raises(InputError, match="threads"):
        fit_volume(*args, threads=0)
    with pytest.raises(InputError, match="model"):
        fit_volume(42, *args[1:])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- helpers
def test_names_units_vectors_prefixes():
    assert bids_map_name("sub-01", "noddi", "icvf") == "sub-01_model-noddi_param-icvf_dwimap.nii.gz"
    assert bids_map_name("", "ball_stick", "odi", desc="uncertainty") == \
        "model-ballStick_param-odi_desc-uncertainty_dwimap.nii.gz"
    assert bids_map_name("sub-1", "smt_noddi", "lambda_par") == \
        "sub-1_model-smtNoddi_param-lambdaPar_dwimap.nii.gz"
    v = mu_to_vectors(np.array([[0.0, 0.0], [np.pi / 2, np.pi / 2], [np.nan, 0.0]]))
    np.testing.assert_allclose(v, [[0, 0, 1], [0, 1, 0], [0, 0, 0]], atol=1e-12)
    assert prefix_from_filename("sub-01_ses-2_acq-hi_dwi.nii.gz") == "sub-01_ses-2_acq-hi"
    assert prefix_from_filename("dwi.nii.gz") is None
    assert angular_error_deg(np.array([0, 0, 1.0]), np.array([0, 0, -1.0])) == \
        pytest.approx(0)
    assert angular_error_deg(np.array([1, 0, 0.0]), np.array([0, 1.0, 0])) == pytest.approx(90)


def test_phantom_is_reproducible_and_written_faithfully(phantom, files):
    again = noddi_phantom(shape=(5, 4, 3), seed=3, snr=50, background=1)
    np.testing.assert_array_equal(again["dwi"], phantom["dwi"])
    other = noddi_phantom(shape=(5, 4, 3), seed=4, snr=50, background=1)
    assert not np.array_equal(other["dwi"], phantom["dwi"])
    img = nib.load(files["dwi"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), phantom["dwi"])
    np.testing.assert_allclose(img.affine, phantom["affine"])
    assert gzip.open(files["dwi"]).read(4)  # gzipped
    from fingerprint.io.gradients import read_bvals_bvecs

    scheme = read_bvals_bvecs(files["bval"], files["bvec"])
    ref = default_scheme()
    np.testing.assert_allclose(scheme.bvalues, ref.bvalues)
    np.testing.assert_allclose(scheme.gradient_directions, ref.gradient_directions, atol=1e-7)
    from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues

    untimed = acquisition_scheme_from_bvalues(ref.bvalues, ref.gradient_directions)
    assert scheme.hash == untimed.hash  # exact round trip through the FSL files
    truth = nib.load(files["truth_direction"]).get_fdata()
    np.testing.assert_allclose(truth, phantom["truth"]["direction"], atol=1e-6)
    m = phantom["mask"]
    np.testing.assert_allclose(np.linalg.norm(truth[m], axis=-1), 1, atol=1e-6)
    # noise-free signal of the phantom's parameters has the expected S0
    clean = noddi_phantom(shape=(2, 2, 1), seed=0, snr=None, s0=100.0)
    b0 = np.asarray(clean["scheme"].b0_mask)
    np.testing.assert_allclose(clean["dwi"][..., b0], 100.0, rtol=1e-5)
