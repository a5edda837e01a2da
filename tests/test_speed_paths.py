"""The faster code paths give the numbers of the slower ones they replace, and the stage
profile (`fingerprint fit --profile`) reports every stage. No timings are asserted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.fitting.features import FeatureMap
from fingerprint.fitting.quality import fit_limit, profile_orientation_sd
from fingerprint.models import get_model
from fingerprint.phantoms import noddi_phantom, write_phantom
from fingerprint.stages import Laps, StageProfile, profile_stages, stage

SIZE = 3000


@pytest.fixture(scope="module")
def hcp_scheme(reference_dir):
    from fingerprint.io.gradients import read_bvals_bvecs

    base = reference_dir / "schemes" / "hcp"
    return read_bvals_bvecs(f"{base}.bval", f"{base}.bvec")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(4, 3, 2), seed=3, snr=30)
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"), prefix="sub-01")


def test_analytic_orientation_sd_equals_finite_differences(hcp_scheme):
    model = get_model("noddi")
    fmap = FeatureMap.from_model(model, hcp_scheme)
    rng = np.random.default_rng(4)
    n = 300
    vec = np.column_stack([rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n),
                           rng.uniform(0.03, 0.95, n), rng.uniform(0.1, 0.95, n),
                           rng.uniform(0, 0.5, n)])
    vec = np.column_stack([vec[:, :4], vec[:, 4], 1.0 - vec[:, 4]])
    signals = model.simulate_signal(hcp_scheme, vec)
    frames = rng.normal(size=(n, 3))
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    feats = fmap.voxel_features(signals, frames)
    sigma2 = rng.uniform(1e-5, 1e-2, n)
    dwi = ~np.asarray(hcp_scheme.b0_mask)
    analytic = profile_orientation_sd(fmap, feats, frames, sigma2, dwi)
    numeric = profile_orientation_sd(fmap.reconstruct, feats, frames, sigma2, dwi)
    assert analytic.shape == (n,)
    assert np.all(analytic > 0) and np.all(analytic <= 90.0)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)
    # isotropic profiles carry no orientation: 90 degrees, as before
    iso = feats.copy()
    iso[:, [c for c in range(feats.shape[1]) if c not in fmap.offsets]] = 0.0
    np.testing.assert_array_equal(profile_orientation_sd(fmap, iso, frames, sigma2, dwi),
                                  np.full(n, 90.0))


def test_fit_limit_is_the_f_quantile():
    from scipy.stats import f

    for n_fit, dof in ((288, 17), (3, 5), (90, 3)):
        assert fit_limit(n_fit, dof) == pytest.approx(max(3.0, f.ppf(1 - 1e-3, n_fit, dof)),
                                                      rel=1e-12)


def test_stage_profile_records_nothing_unless_active():
    with stage("outside"):
        pass
    with profile_stages() as prof:
        with stage("a"):
            with stage("a/b"):
                pass
        lap = Laps("a/")
        lap("c")
        lap("c")
        prof.count_voxels(10)
    assert set(prof.seconds) == {"a", "a/b", "a/c"}
    assert prof.calls["a/c"] == 2
    assert [r[0] for r in prof.rows()] == ["a", "a/b", "a/c"]
    assert "wall" in prof.table() and "10 voxels" in prof.table()
    assert prof.to_dict()["voxels"] == 10
    spans = prof.to_dict()["stages"]
    for name in ("a", "a/b", "a/c"):  # when each stage ran, from the profile's start
        assert 0 <= spans[name]["began"] <= spans[name]["ended"] <= prof.wall_seconds
    assert spans["a"]["began"] <= spans["a/b"]["began"] <= spans["a/b"]["ended"] \
        <= spans["a"]["ended"] <= spans["a/c"]["began"]
    empty = StageProfile()
    assert empty.rows() == []


def test_fit_profile_prints_every_stage(capsys, files, tmp_path):
    code = main(["fit", "--model", "noddi", "--dwi", str(files["dwi"]), "--bval",
                 str(files["bval"]), "--bvec", str(files["bvec"]), "--mask",
                 str(files["mask"]), "--out", str(tmp_path / "maps"), "--dictionary-size",
                 str(SIZE), "--threads", "1", "--no-progress", "--profile"])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = out[out.index("stage profile"):]
    for name in ("inputs", "mask", "dictionary", "read", "fit", "frames", "features",
                 "search", "posterior", "refine", "quality", "flags", "write", "wall"):
        assert f"\n{name} " in table or f"  {name} " in table, (name, table)
    assert "24 voxels" in table


@pytest.fixture(scope="module")
def multi_slab(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(5, 4, 6), seed=5, snr=30)
    return write_phantom(phantom, tmp_path_factory.mktemp("slabs"), prefix="sub-02")


def _maps(result) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {k: np.asarray(nib.load(p).dataobj) for k, p in result.maps.items()}


def test_overlapped_reading_gives_the_same_maps(multi_slab, tmp_path):
    """A gzip DWI read in many slabs (decompressed in the background while the dictionary
    loads, each slab read while the previous one is fitted) gives the maps of one read."""
    from fingerprint.fitting.pipeline import fit_volume

    args = ("noddi", multi_slab["dwi"], multi_slab["bval"], multi_slab["bvec"])
    one = fit_volume(*args, tmp_path / "one", mask=multi_slab["mask"], threads=1,
                     dictionary_size=SIZE)
    with profile_stages() as prof:
        many = fit_volume(*args, tmp_path / "many", mask=multi_slab["mask"], threads=1,
                          dictionary_size=SIZE, slab_bytes=1, chunk_voxels=7)
    assert prof.calls["read/decompress"] == 1
    assert prof.calls["read"] >= 6  # one slice per slab, each read ahead
    a, b = _maps(one), _maps(many)
    assert set(a) == set(b) and "odi" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [p.name for p in one.files] == [p.name for p in many.files]
    leftovers = [p.name for p in (tmp_path / "many").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the decompressed copy is removed


def test_read_ahead_errors_reach_the_fit(multi_slab, tmp_path):
    """A DWI whose gzip stream is corrupt fails with an InputError naming it, also when
    the decompression runs in the background."""
    from fingerprint.errors import InputError
    from fingerprint.fitting.pipeline import fit_volume

    raw = multi_slab["dwi"].read_bytes()
    bad = tmp_path / "sub-03_dwi.nii.gz"
    cut = len(raw) // 2
    bad.write_bytes(raw[:cut] + bytes(b ^ 0x5A for b in raw[cut:cut + 64]) + raw[cut + 64:])
    with pytest.raises(InputError, match="sub-03_dwi.nii.gz"):
        fit_volume("noddi", bad, multi_slab["bval"], multi_slab["bvec"], tmp_path / "out",
                   mask=multi_slab["mask"], threads=1, dictionary_size=SIZE, slab_bytes=1)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir()) \
        if (tmp_path / "out").exists() else True


def test_float32_signals_give_the_estimates_of_float64(hcp_scheme):
    """float32 signals go into the estimator without a float64 copy; the estimates are
    those of the same values as float64."""
    from fingerprint.fitting.engine import get_estimator
    from fingerprint.fitting.validity import usable_voxels

    model = get_model("noddi")
    rng = np.random.default_rng(6)
    n = 200
    vec = np.column_stack([rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n),
                           rng.uniform(0.03, 0.95, n), rng.uniform(0.1, 0.95, n)])
    iso = rng.uniform(0, 0.5, n)
    vec = np.column_stack([vec, iso, 1.0 - iso])
    signals = (model.simulate_signal(hcp_scheme, vec) * 900.0 +
               rng.normal(0, 20, (n, hcp_scheme.number_of_measurements)))
    data32 = np.abs(signals).astype(np.float32)
    data32[3, 5] = np.nan
    data32[4, 7] = -1.0
    data32[5, np.asarray(hcp_scheme.b0_mask)] = 0.0
    usable = usable_voxels(data32, hcp_scheme.b0_mask)
    with np.errstate(invalid="ignore"):
        expected = (np.isfinite(data32).all(1) & (data32 >= 0).all(1)
                    & (data32[:, np.asarray(hcp_scheme.b0_mask)].mean(1) > 0))
    np.testing.assert_array_equal(usable, expected)
    assert list(np.flatnonzero(~usable)) == [3, 4, 5]
    est = get_estimator(model, hcp_scheme, dictionary_size=SIZE, n_jobs=1)
    a = est.estimate(data32[usable])
    b = est.estimate(data32[usable].astype(np.float64))
    for field in ("parameters", "uncertainty", "s0", "r2", "sigma", "orientation_sd"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_wide_searches_use_a_cached_ivf_index_with_full_recall(tmp_path):
    """The main match (k >= IVF_MIN_K) on an approximate matcher searches an IVF index:
    recall against the exact search at least that of the HNSW graph (0.99), the index is
    cached beside the store, and a second matcher (from the cache) finds the same atoms.
    Quick matches of a few neighbours stay on the graph."""
    from fingerprint.fitting.matcher import IVF_MIN_K, Matcher

    rng = np.random.default_rng(7)
    # a 3-parameter family in 12 features, like a dictionary's atoms
    t = rng.uniform(0, 1, (6000, 3))
    basis = rng.normal(size=(3, 12))
    atoms = np.tanh(t @ basis) + 0.1 * np.sin(3 * t @ basis)
    queries = np.tanh(rng.uniform(0, 1, (500, 3)) @ basis) + 0.1 * np.sin(
        3 * rng.uniform(0, 1, (500, 3)) @ basis) + rng.normal(0, 0.01, (500, 12))
    cache = tmp_path / "store.zarr.hnsw16.faiss"
    exact = Matcher(atoms, method="exact")
    a = Matcher(atoms, method="hnsw", cache_path=cache)
    k = max(IVF_MIN_K, 32)
    _, ie = exact.search(queries, k)
    da, ia = a.search(queries, k)
    recall = np.mean([len(set(ia[i]) & set(ie[i])) / k for i in range(len(queries))])
    assert recall >= 0.99
    assert np.all(np.diff(da, axis=1) >= 0)  # sorted by distance
    ivf_files = list(tmp_path.glob("store.zarr.ivf*.faiss"))
    assert len(ivf_files) == 1 and a._ivf is not None
    b = Matcher(atoms, method="hnsw", cache_path=cache)
    _, ib = b.search(queries, k)
    np.testing.assert_array_equal(ia, ib)
    _, i4 = b.search(queries, 4, ef_search=8)  # a quick match: the graph
    assert b._hnsw is not None and i4.shape == (500, 4)


def test_quick_match_probes_the_given_number_of_ivf_lists():
    """A search given ``nprobe`` on an approximate matcher uses the inverted file: probing
    every list is the exact search, probing one finds most of the nearest atoms; exact
    matchers ignore ``nprobe``."""
    from fingerprint.fitting.matcher import Matcher, _ivf_lists

    rng = np.random.default_rng(8)
    t = rng.uniform(0, 1, (5000, 3))
    basis = rng.normal(size=(3, 12))
    atoms = np.tanh(t @ basis)
    queries = np.tanh(rng.uniform(0, 1, (300, 3)) @ basis) + rng.normal(0, 0.01, (300, 12))
    exact = Matcher(atoms, method="exact")
    approx = Matcher(atoms, method="hnsw")
    de, ie = exact.search(queries, 4)
    da, ia = approx.search(queries, 4, nprobe=_ivf_lists(atoms.shape[0]))
    assert approx._ivf is not None
    np.testing.assert_array_equal(ia, ie)
    np.testing.assert_allclose(da, de, rtol=1e-5, atol=1e-6)
    _, i1 = approx.search(queries, 4, nprobe=1)
    recall = np.mean([len(set(i1[i]) & set(ie[i])) / 4 for i in range(len(queries))])
    assert 0.5 < recall <= 1.0
    np.testing.assert_array_equal(exact.search(queries, 4, nprobe=1)[1], ie)
