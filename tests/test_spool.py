"""The spool of a gzip DWI (fingerprint.io.spool): the values of its masked voxels equal
nibabel's for every data type and scaling, slabs stay within their memory bound, the maps
of a fit read through it equal those read without it, errors name the file and leave no
temporary file, and the command line's early decompression is adopted by the fit."""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.errors import InputError
from fingerprint.fitting import pipeline
from fingerprint.fitting.pipeline import fit_volume
from fingerprint.io import nifti, spool
from fingerprint.io.nifti import DWIImage
from fingerprint.io.spool import DWISpool, SpoolSource
from fingerprint.phantoms import noddi_phantom, write_phantom

SIZE = 3000


def _write(tmp_path: Path, dtype: str, slope: float | None, shape=(6, 5, 7, 9),
           name: str = "dwi.nii.gz") -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    data = rng.uniform(1, 1000, shape).astype(dtype)
    if data.dtype.kind == "f":
        data[1, 2, 3, 4] = np.nan
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 3.0)
    path = tmp_path / name
    nib.save(img, path)
    return path, data


def _gathered(slabs) -> tuple[np.ndarray, np.ndarray]:
    slabs = list(slabs)
    values = np.concatenate([s.data for s in slabs])
    coords = np.concatenate([s.coords for s in slabs])
    return values, coords


@pytest.mark.parametrize("dtype, slope", [("<f4", None), (">f4", None), ("<f4", 2.0),
                                          ("<i2", 0.5), ("<f8", None), ("<u1", None)])
@pytest.mark.parametrize("partial", [False, True])
def test_spooled_values_equal_nibabel(tmp_path, dtype, slope, partial):
    """Every masked voxel once, with nibabel's float32 values bit for bit, whatever the
    data type, byte order and scaling; a spool of a mask holds only its voxels."""
    path, data = _write(tmp_path, dtype, slope)
    image = DWIImage(path)
    rng = np.random.default_rng(5)
    mask = rng.uniform(size=data.shape[:3]) < 0.5 if partial else np.ones(data.shape[:3],
                                                                          bool)
    expected = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    with DWISpool(SpoolSource.of(image), mask, tmp_path / "spool").start() as sp:
        sp.wait()
        assert sp.n_selected == int(mask.sum())
        assert os.fstat(sp._fd).st_size == sp.nbytes == mask.sum() * 9 * data.itemsize
        for max_bytes in (1, 500, 10**9):
            values, coords = _gathered(sp.iter_slabs(mask, max_bytes=max_bytes))
            assert values.dtype == np.float32 and values.flags.c_contiguous
            np.testing.assert_array_equal(values, expected[tuple(coords.T)])
            assert sorted(map(tuple, coords)) == sorted(map(tuple, np.argwhere(mask)))
        # a subset of the selection (the default mask of an unmasked spool, for instance)
        sub = mask & (rng.uniform(size=mask.shape) < 0.5)
        values, coords = _gathered(sp.iter_slabs(sub, max_bytes=700))
        np.testing.assert_array_equal(values, expected[tuple(coords.T)])
        assert len(coords) == sub.sum()
        b0 = np.zeros(9, bool)
        b0[[0, 4]] = True
        np.testing.assert_array_equal(sp.mean_b0(b0), np.where(
            mask, DWIImage(path).mean_b0(b0), 0))
    assert not list((tmp_path / "spool").iterdir())


def test_slabs_are_those_of_the_direct_reads(tmp_path):
    """The spool gives the slabs of DWIImage.iter_slabs (same slices, same voxel order,
    same values), so a fit cuts the same chunks either way; each slab's float32 signals
    take at most ``max_bytes`` (one slice at least)."""
    path, data = _write(tmp_path, "<i2", 0.5, shape=(8, 7, 6, 11))
    image = DWIImage(path)
    mask = np.ones(data.shape[:3], bool)
    mask[2:5, 1:3, :] = False
    mask[:, :, 3] = False  # a slice without voxels
    one_slice = 8 * 7 * 11 * 4
    with image.spooled(mask, tmp_path / "spool", max_bytes=1) as sp:
        for max_bytes in (1, one_slice * 2, one_slice * 4 + 5, 10**9):
            slabs = list(sp.iter_slabs(mask, max_bytes=max_bytes))
            direct = list(image.iter_slabs(mask, max_bytes=max_bytes))
            assert len(slabs) == len(direct) == sp.n_slabs(mask, max_bytes) \
                == image.n_slabs(mask, max_bytes)
            for s, d in zip(slabs, direct, strict=True):
                assert (s.start, s.stop) == (d.start, d.stop)
                np.testing.assert_array_equal(s.coords, d.coords)
                np.testing.assert_array_equal(s.data, d.data)
                assert s.data.flags.c_contiguous and s.data.dtype == np.float32
                assert s.data.nbytes <= max(max_bytes, one_slice)
            later = list(sp.iter_slabs(mask, max_bytes=max_bytes, start_slice=2))
            assert all(s.start >= 2 for s in later)
            assert sum(len(s.coords) for s in later) == mask[:, :, 2:].sum()


def test_errors_name_the_file_and_leave_nothing_behind(tmp_path):
    """A truncated stream (header intact), a corrupt one, a mask wider than the spooled
    voxels: InputErrors naming the file; no temporary file is left in the directory."""
    path, data = _write(tmp_path, "<f4", None)
    raw = gzip.decompress(path.read_bytes())
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[:len(raw) - 5000]))
    image = DWIImage(path)
    source = SpoolSource.of(image)
    cut = dataclasses.replace(source, path=short)
    out = tmp_path / "spool"
    with pytest.raises(InputError, match=r"short.nii.gz is truncated.*volume"):
        with DWISpool(cut, None, out).start() as sp:
            sp.wait()
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(blob))
    corrupt = dataclasses.replace(source, path=bad)
    for threads in (1, 2):
        with pytest.raises(InputError, match="bad.nii.gz"):
            with DWISpool(corrupt, None, out, threads=threads).start() as sp:
                sp.wait()
    mask = np.zeros(data.shape[:3], bool)
    mask[0, 0, :] = True
    with DWISpool(source, mask, out).start() as sp:
        wider = mask.copy()
        wider[1, 1, 1] = True
        with pytest.raises(InputError, match="not decompressed"):
            list(sp.iter_slabs(wider, max_bytes=1))
        with pytest.raises(InputError, match="mask shape"):
            list(sp.iter_slabs(mask[:, :, :3], max_bytes=1))
    with pytest.raises(InputError, match="selection shape"):
        DWISpool(source, mask[:3], out)
    assert not list(out.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=r"cannot decompress DWI file .*dwi.nii.gz"):
        DWISpool(source, None, blocker / "sub").start()


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(5, 4, 6), seed=11, snr=30, background=1)
    return write_phantom(phantom, tmp_path_factory.mktemp("spool"), prefix="sub-07")


def _maps(result) -> dict[str, np.ndarray]:
    return {k: np.asarray(nib.load(p).dataobj) for k, p in result.maps.items()}


def test_maps_read_through_the_spool_equal_the_direct_reads(phantom_files, tmp_path):
    """The same fit read in one slab by nibabel (no spool) and through the spool of the
    masked voxels in many small slabs gives bit-identical maps, with a mask and
    without (the default mask made from the spool)."""
    args = ("noddi", phantom_files["dwi"], phantom_files["bval"], phantom_files["bvec"])
    mask = np.asarray(nib.load(phantom_files["mask"]).dataobj) > 0
    mask[0, :, :] = False  # a part of the volume
    for given in (mask, None):
        direct = fit_volume(*args, tmp_path / "direct", mask=given, dictionary_size=SIZE,
                            threads=2)
        spooled = fit_volume(*args, tmp_path / "spooled", mask=given,
                             dictionary_size=SIZE, threads=2, slab_bytes=1, chunk_voxels=7)
        a, b = _maps(direct), _maps(spooled)
        assert set(a) == set(b) and "odi" in a
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert not [p for p in (tmp_path / "spooled").iterdir() if p.name.startswith(".")]


def test_prefetched_spool_is_adopted_once(tmp_path):
    """A prefetched spool is adopted by the reader of the same file and directory whose
    mask it holds, once; others start their own; the ones left are discarded."""
    path, data = _write(tmp_path, "<f4", None)
    mask = np.zeros(data.shape[:3], bool)
    mask[:, :, 2:5] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    out = tmp_path / "out"
    assert nifti.prefetch(tmp_path / "missing.nii.gz", out) is None
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), plain)
    assert nifti.prefetch(plain, out) is None  # not compressed: nothing to spool
    assert nifti.prefetch(path, out, max_bytes=10**9) is None  # one slab: no spool
    early = nifti.prefetch(path, out, tmp_path / "mask.nii.gz", max_bytes=1)
    assert early is not None and early.n_selected == mask.sum()
    try:
        assert spool.adopt(path, tmp_path / "elsewhere", mask) is None
        wider = mask.copy()
        wider[0, 0, 0] = True
        assert spool.adopt(path, out, wider) is None
        image = DWIImage(path)
        with image.spooled(mask, out, max_bytes=1) as sp:
            assert sp is early
            values, coords = _gathered(sp.iter_slabs(mask, max_bytes=1))
        np.testing.assert_array_equal(values, data[tuple(coords.T)])
        assert spool.adopt(path, out, mask) is None  # adopted once
        again = nifti.prefetch(path, out, max_bytes=1)
        assert again is not None
    finally:
        spool.discard_prefetched()
    assert again._fd is None and not list(out.iterdir())


def test_the_command_line_decompresses_before_importing_the_fit(phantom_files, tmp_path,
                                                                monkeypatch):
    """``fingerprint fit`` starts the spool before the fitting code runs and the fit
    adopts it; the maps are those of the library call; nothing is left behind."""
    from fingerprint.cli.main import main

    adopted: list[object] = []
    original = spool.adopt

    def adopt(*args, **kwargs):
        found = original(*args, **kwargs)
        adopted.append(found)
        return found

    monkeypatch.setattr(nifti, "adopt", adopt)
    monkeypatch.setattr(nifti, "DEFAULT_SLAB_BYTES", 1)
    monkeypatch.setitem(pipeline.fit_volume.__kwdefaults__, "slab_bytes", 1)
    out = tmp_path / "cli"
    code = main(["fit", "--model", "noddi", "--dwi", str(phantom_files["dwi"]),
                 "--bval", str(phantom_files["bval"]), "--bvec", str(phantom_files["bvec"]),
                 "--mask", str(phantom_files["mask"]), "--out", str(out),
                 "--dictionary-size", str(SIZE), "--threads", "2", "--no-progress"])
    assert code == 0
    assert len(adopted) == 1 and isinstance(adopted[0], DWISpool)
    assert not spool._PREFETCHED
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    lib = fit_volume("noddi", phantom_files["dwi"], phantom_files["bval"],
                     phantom_files["bvec"], tmp_path / "lib", mask=phantom_files["mask"],
                     dictionary_size=SIZE, threads=2, prefix="sub-07")
    for key, p in lib.maps.items():
        np.testing.assert_array_equal(np.asarray(nib.load(p).dataobj),
                                      np.asarray(nib.load(out / p.name).dataobj),
                                      err_msg=key)
    # a failing command discards its early spool
    bad = main(["fit", "--model", "noddi", "--dwi", str(phantom_files["dwi"]),
                "--bval", str(phantom_files["bvec"]), "--bvec", str(phantom_files["bvec"]),
                "--out", str(tmp_path / "bad"), "--no-progress"])
    assert bad != 0 and not spool._PREFETCHED
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())


def test_a_large_spool_is_released_in_the_background(tmp_path, monkeypatch):
    """Closing a large spool stops using it at once and frees its file by a background
    thread; nothing is left in the directory."""
    import threading

    path, data = _write(tmp_path, "<f4", None)
    monkeypatch.setattr(spool, "_RELEASE_IN_BACKGROUND_BYTES", 0)
    sp = DWISpool(SpoolSource.of(DWIImage(path)), None, tmp_path / "spool").start()
    sp.wait()
    sp.close()
    assert sp._fd is None
    releasing = [t for t in threading.enumerate() if t.name == "fingerprint-spool-release"]
    for thread in releasing:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert not list((tmp_path / "spool").iterdir())
    with pytest.raises(RuntimeError, match="closed"):
        sp.read_rows(0, 1)


def test_the_command_line_starts_the_spool_before_the_heavy_imports(tmp_path):
    """``fingerprint fit`` reaches the early decompression without importing Numba,
    SciPy, FAISS or the fitting code (about a second of start-up it overlaps)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        import fingerprint.cli.fit as fit
        from fingerprint.cli.main import main

        def early(args, stack):
            heavy = [m for m in ("numba", "scipy", "faiss", "fingerprint.fitting.pipeline")
                     if m in sys.modules]
            print("heavy:", ",".join(heavy))
            raise SystemExit(0)

        fit._prefetch_dwi = early
        main(["fit", "--model", "noddi", "--dwi", "dwi.nii.gz", "--bval", "b", "--bvec",
              "v", "--out", {str(tmp_path / "out")!r}])
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "heavy: \n" in run.stdout, run.stdout


def test_checked_float32_names_the_file_beyond_the_float32_range():
    from fingerprint.io.spool import checked_float32

    ok = checked_float32(np.array([1.5, -2.0, np.nan], dtype=np.float64), "dwi.nii.gz")
    assert ok.dtype == np.float32
    np.testing.assert_array_equal(ok[:2], [1.5, -2.0])
    assert np.isnan(ok[2])
    with pytest.raises(InputError, match=r"dwi\.nii\.gz holds values up to 1e\+300"):
        checked_float32(np.array([1.0, 1e300]), "dwi.nii.gz")
