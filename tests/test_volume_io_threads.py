"""Reading and thread scheduling of volume fits: the gzip completeness check decompresses
nothing for a complete file, chunks fitted side by side by several threads give the maps
of one chunk at a time, and the kernels those threads run release the GIL. No timings are
asserted."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.errors import CancelledError, InputError
from fingerprint.fitting import pipeline
from fingerprint.fitting.pipeline import fit_volume
from fingerprint.io import nifti
from fingerprint.io.nifti import DWIImage, check_file_complete, open_nifti
from fingerprint.io.spool import DWISpool
from fingerprint.phantoms import noddi_phantom, write_phantom
from fingerprint.stages import profile_stages

SIZE = 3000


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(5, 4, 6), seed=8, snr=30)
    return write_phantom(phantom, tmp_path_factory.mktemp("threads"), prefix="sub-04")


def _maps(result) -> dict[str, np.ndarray]:
    return {k: np.asarray(nib.load(p).dataobj) for k, p in result.maps.items()}


class _Untouchable:
    """An array proxy that fails when its data are read."""

    def __init__(self, proxy):
        self.offset = proxy.offset

    def __getitem__(self, item):
        raise AssertionError("the data were read")


def _gzip_image(tmp_path: Path, name: str = "dwi.nii.gz") -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(1).uniform(1, 100, (4, 3, 5, 6)).astype(np.float32)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path, data


def test_a_complete_gzip_file_is_checked_without_decompressing_it(tmp_path):
    """The gzip trailer's size matches the data block that starts at the proxy's offset
    (the header copy of a loaded image says 0), so no voxel is read to check it."""
    path, _ = _gzip_image(tmp_path)
    img = open_nifti(path, "DWI")
    assert img.dataobj.offset >= 348

    class Image:
        header = img.header
        shape = img.shape
        dataobj = _Untouchable(img.dataobj)

    check_file_complete(Image(), path, "DWI")  # reads nothing
    DWIImage(path)  # the same check when opening


def test_truncated_and_multi_member_gzip_files(tmp_path, monkeypatch):
    """A truncated gzip DWI is refused naming the file; a multi-member gzip stream (whose
    trailer holds only the last member's size) is complete and reads as the original."""
    path, data = _gzip_image(tmp_path)
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(InputError, match="cut.nii.gz.*truncated"):
        DWIImage(cut)
    multi = tmp_path / "multi.nii.gz"
    half = len(raw) // 2
    multi.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    image = DWIImage(multi)
    mask = np.ones(data.shape[:3], bool)
    slabs = list(image.iter_slabs(mask))
    values = np.concatenate([s.data for s in slabs])
    coords = np.concatenate([s.coords for s in slabs])
    np.testing.assert_array_equal(values, data[tuple(coords.T)])
    multi_cut = tmp_path / "multicut.nii.gz"
    multi_cut.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:-100]))
    with pytest.raises(InputError, match="multicut.nii.gz"):
        DWIImage(multi_cut)  # a small file is inflated to check it
    monkeypatch.setattr(nifti, "DEEP_CHECK_BYTES", 0)
    short = DWIImage(multi_cut)  # a large one is not: the reads find the end
    with pytest.raises(InputError, match="multicut.nii.gz"):
        list(short.iter_slabs(mask))
    with pytest.raises(InputError, match="multicut.nii.gz.*truncated"):
        with short.spooled(mask, tmp_path / "spool", max_bytes=1):
            pass
    with pytest.raises(InputError, match="multicut.nii.gz"):
        check_file_complete(short.img, multi_cut, "DWI")  # the deep check still inflates
    assert not any((tmp_path / "spool").iterdir())


def test_a_multi_member_gzip_file_is_not_inflated_when_opened(tmp_path, monkeypatch):
    """Opening a multi-member gzip DWI (whose trailer gives only its last member's size)
    reads no voxel; its spool holds the voxels of the original."""
    path, data = _gzip_image(tmp_path)
    raw = gzip.decompress(path.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    third = len(raw) // 3
    multi.write_bytes(b"".join(gzip.compress(raw[i:i + third])
                               for i in range(0, len(raw), third)))
    img = open_nifti(multi, "DWI")

    class Image:
        header = img.header
        shape = img.shape
        dataobj = _Untouchable(img.dataobj)

    check_file_complete(Image(), multi, "DWI", deep=False)  # reads nothing
    monkeypatch.setattr(nifti, "DEEP_CHECK_BYTES", 0)
    image = DWIImage(multi)
    mask = np.zeros(data.shape[:3], bool)
    mask[1:3, :, 1:4] = True
    with image.spooled(mask, tmp_path / "spool", max_bytes=1) as spool:
        assert isinstance(spool, DWISpool) and spool.n_selected == mask.sum()
        slabs = list(spool.iter_slabs(mask, max_bytes=1))
    values = np.concatenate([s.data for s in slabs])
    coords = np.concatenate([s.coords for s in slabs])
    np.testing.assert_array_equal(values, data[tuple(coords.T)])
    assert sorted(map(tuple, coords)) == sorted(map(tuple, np.argwhere(mask)))


def test_chunks_fitted_side_by_side_give_the_maps_of_one_thread(volume, tmp_path,
                                                                  monkeypatch):
    """threads=2 fits two chunks at once, each with single-threaded kernels; the maps
    are those of threads=1 and of threads=2 one chunk at a time (its kernels on two
    threads), whatever the slab and chunk sizes."""
    args = ("noddi", volume["dwi"], volume["bval"], volume["bvec"])
    common = dict(mask=volume["mask"], dictionary_size=SIZE)
    one = fit_volume(*args, tmp_path / "one", threads=1, **common)
    with profile_stages() as prof:
        side = fit_volume(*args, tmp_path / "side", threads=2, slab_bytes=1,
                          chunk_voxels=9, **common)
    assert prof.calls["read/decompress"] == 1
    assert prof.calls["fit"] >= 10  # chunks of ceil(9 / 2) voxels
    with profile_stages() as prof:
        small = fit_volume(*args, tmp_path / "small", threads=2, **common)
    assert prof.calls["fit"] == 2  # fewer voxels than a chunk: one half for each thread
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_fit_threads", lambda fitter, options: 1)
        seq = fit_volume(*args, tmp_path / "seq", threads=2, chunk_voxels=11, **common)
    a = _maps(one)
    assert "odi" in a
    for other in (side, seq, small):
        b = _maps(other)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not [p for p in (tmp_path / "side").iterdir() if p.name.startswith(".")]


def test_fitting_threads(volume, tmp_path):
    """The built-in solver fits chunks on ``threads`` threads (default: the CPUs this
    process may use); the others one chunk at a time. A cancelled threaded fit stops
    and leaves no temporary file."""
    from fingerprint.fitting.engine import prepare_fitter
    from fingerprint.fitting.options import FitOptions
    from fingerprint.models import get_model

    scheme = pipeline.read_fsl_scheme(volume["bval"], volume["bvec"])
    fitter = prepare_fitter(get_model("noddi"), scheme,
                            FitOptions(dictionary_size=SIZE, threads=3))
    assert pipeline._fit_threads(fitter, FitOptions(threads=3)) == 3
    assert pipeline._fit_threads(fitter, FitOptions()) >= 1
    dti = prepare_fitter(get_model("dti"), scheme, FitOptions(threads=3))
    assert pipeline._fit_threads(dti, FitOptions(threads=3)) == 1
    with pipeline._fitting_threads(fitter, 2) as (pool, worker):
        assert worker.estimator is not fitter.estimator
        assert worker.estimator.n_jobs == 1 and fitter.estimator.n_jobs == 3
        assert worker.estimator.matcher is fitter.estimator.matcher  # shared, not copied
        assert pool._max_workers == 2
    calls = []
    with pytest.raises(CancelledError):
        fit_volume("noddi", volume["dwi"], volume["bval"], volume["bvec"], tmp_path / "c",
                   mask=volume["mask"], dictionary_size=SIZE, threads=2, slab_bytes=1,
                   chunk_voxels=4, should_cancel=lambda: bool(calls.append(1)) or
                   len(calls) > 6)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_parallel_kernels_release_the_gil():
    """Both versions of a parallel kernel are compiled with nogil, so that threads
    fitting their own chunks run them side by side."""
    from fingerprint.kernels import features

    kernels = [getattr(features, name) for name in dir(features)
               if hasattr(getattr(features, name), "serial_rows")]
    assert kernels
    for kernel in kernels:
        assert kernel.targetoptions.get("nogil") is True, kernel
        assert kernel.serial.targetoptions.get("nogil") is True, kernel


@pytest.mark.parametrize("decompressor", ["parallel", "isal", "stdlib"])
def test_every_decompressor_gives_the_same_spooled_copy(tmp_path, monkeypatch, decompressor):
    """The spooled copy of a gzip DWI is the same whichever library decompresses it
    (rapidgzip on several cores, ISA-L, or the standard library when neither is
    installed); a corrupt stream is an InputError naming the file with each."""
    from fingerprint.io import spool

    if decompressor == "parallel":
        if spool._parallel_gzip is None:
            pytest.skip("rapidgzip is not installed")
        monkeypatch.setattr(spool, "available_cpus", lambda: 2)
    else:
        monkeypatch.setattr(spool, "_parallel_gzip", None)
        if decompressor == "stdlib":
            monkeypatch.setattr(spool, "_fast_gzip", gzip)
    path, data = _gzip_image(tmp_path)
    dwi = DWIImage(path)
    mask = np.ones(data.shape[:3], bool)
    with dwi.spooled(mask, tmp_path / "spool", max_bytes=1) as copy:
        assert isinstance(copy, DWISpool)
        slabs = list(copy.iter_slabs(mask, max_bytes=1))
    values = np.concatenate([s.data for s in slabs])
    coords = np.concatenate([s.coords for s in slabs])
    np.testing.assert_array_equal(values, data[tuple(coords.T)])
    assert not any((tmp_path / "spool").iterdir())
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="bad.nii.gz"):
        with DWIImage(bad).spooled(mask, tmp_path / "spool", max_bytes=1):
            pass
    assert not any((tmp_path / "spool").iterdir())


def test_maps_without_the_optional_decompressors(volume, tmp_path, monkeypatch):
    """Without rapidgzip and ISA-L (the standard library's gzip) a fit gives the maps of
    the default decompressor."""
    from fingerprint.io import spool

    args = ("noddi", volume["dwi"], volume["bval"], volume["bvec"])
    common = dict(mask=volume["mask"], dictionary_size=SIZE, threads=2, slab_bytes=1)
    default = fit_volume(*args, tmp_path / "default", **common)
    monkeypatch.setattr(spool, "_parallel_gzip", None)
    monkeypatch.setattr(spool, "_fast_gzip", gzip)
    plain = fit_volume(*args, tmp_path / "plain", **common)
    a, b = _maps(default), _maps(plain)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("dtype, slope", [("<f4", None), (">f4", None), ("<f4", 2.0),
                                          ("<i2", 0.5), ("<f8", None)])
def test_direct_reads_of_uncompressed_files_equal_nibabel(tmp_path, dtype, slope):
    """Uncompressed float32 files without scaling (the spooled copies) are read straight
    from the file; the values equal nibabel's, which reads every other file."""
    rng = np.random.default_rng(2)
    data = rng.uniform(1, 1000, (5, 4, 6, 7)).astype(dtype)
    data[1, 2, 3, 4] = np.nan if data.dtype.kind == "f" else 0
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 3.0)
    path = tmp_path / "dwi.nii"
    nib.save(img, path)
    dwi = DWIImage(path)
    direct = dtype in ("<f4", ">f4") and slope is None
    assert (dwi._raw_float32() is not None) == direct
    mask = rng.uniform(size=data.shape[:3]) < 0.6
    for max_bytes in (1, 10**9):
        slabs = list(dwi.iter_slabs(mask, max_bytes=max_bytes))
        values = np.concatenate([s.data for s in slabs])
        coords = np.concatenate([s.coords for s in slabs])
        proxy = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, proxy[tuple(coords.T)])
    truncated = tmp_path / "cut.nii"
    truncated.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputError, match="cut.nii"):
        image = DWIImage(truncated, check=False)
        list(image.iter_slabs(np.ones(data.shape[:3], bool), max_bytes=1))


def test_default_mask_of_a_gzip_input_is_read_from_its_decompressed_copy(tmp_path,
                                                                          monkeypatch):
    """Without a mask, the b=0 volumes of a gzip DWI read in several slabs are read from
    its decompressed copy (the gzip stream is decompressed once); the maps are those of
    the same mask given explicitly."""
    phantom = noddi_phantom(shape=(4, 3, 5), seed=9, snr=30, background=1)
    paths = write_phantom(phantom, tmp_path / "in", prefix="sub-05")
    seen: list[str] = []
    original = DWIImage.mean_b0
    from_spool = DWISpool.mean_b0

    def mean_b0(self, b0_mask):
        seen.append(type(self).__name__)
        return (original if isinstance(self, DWIImage) else from_spool)(self, b0_mask)

    monkeypatch.setattr(DWIImage, "mean_b0", mean_b0)
    monkeypatch.setattr(DWISpool, "mean_b0", mean_b0)
    args = ("noddi", paths["dwi"], paths["bval"], paths["bvec"])
    with profile_stages() as prof:
        default = fit_volume(*args, tmp_path / "default", dictionary_size=SIZE, threads=2,
                             slab_bytes=1)
    assert seen == ["DWISpool"] and prof.calls["read/decompress"] == 1
    image = DWIImage(paths["dwi"])
    mask = original(image, np.asarray(pipeline.read_fsl_scheme(
        paths["bval"], paths["bvec"]).b0_mask)) > 0
    assert 0 < mask.sum() < mask.size  # the background is left out
    given = fit_volume(*args, tmp_path / "given", mask=mask, dictionary_size=SIZE,
                       threads=2, slab_bytes=1)
    assert default.n_voxels == given.n_voxels == int(mask.sum())
    a, b = _maps(default), _maps(given)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(InputError, match="positive"):
        zero = tmp_path / "zero"
        zero.mkdir()
        img = nib.load(paths["dwi"])
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine),
                 zero / "dwi.nii.gz")
        fit_volume("noddi", zero / "dwi.nii.gz", paths["bval"], paths["bvec"],
                   tmp_path / "zero-out", dictionary_size=SIZE, slab_bytes=1)
    assert not [p for p in (tmp_path / "zero-out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("compressor", ["isal", "stdlib"])
def test_maps_are_gzip_nifti_files_equal_to_nibabels(tmp_path, monkeypatch, compressor):
    """Maps compressed by ISA-L (or the standard library without it) are the NIfTI files
    nibabel writes: same header, same voxels, a valid gzip stream."""
    from fingerprint.io import nifti

    if compressor == "stdlib":
        monkeypatch.setattr(nifti, "_fast_gzip", gzip)
    rng = np.random.default_rng(3)
    ref = nib.Nifti1Image(rng.uniform(1, 9, (4, 3, 5, 2)).astype(np.float32),
                          np.diag([2.0, 2.0, 2.5, 1.0]))
    ref.header.set_xyzt_units("mm")
    for data in (rng.uniform(0, 1, (4, 3, 5)).astype(np.float32),
                 rng.normal(size=(4, 3, 5, 3)).astype(np.float32)):
        data[0, 0, 0] = np.nan
        nii, js = nifti.write_map(data, ref, tmp_path, "x_dwimap.nii.gz", {"Units": "n/a"})
        nib.save(nifti.map_image(data, ref), tmp_path / "nibabel.nii.gz")
        ours, theirs = nib.load(nii), nib.load(tmp_path / "nibabel.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.dataobj), data)
        assert ours.header.binaryblock == theirs.header.binaryblock
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        assert gzip.decompress(nii.read_bytes()) == gzip.decompress(
            (tmp_path / "nibabel.nii.gz").read_bytes())
        assert js.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
