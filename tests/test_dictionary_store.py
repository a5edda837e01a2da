"""Dictionary stores: content, lazy validated opening, atomic builds and the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fingerprint.dictionary.build as build_module
from fingerprint.dictionary import (
    build_dictionary,
    default_dictionary_dir,
    get_or_build_dictionary,
    list_dictionaries,
    open_dictionary,
)
from fingerprint.dictionary.store import attrs_checksum
from fingerprint.errors import CancelledError, DictionaryError, InputError
from fingerprint.models import get_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 1500
CHUNK = 512


@pytest.fixture(scope="module")
def hcp_scheme(reference_dir):
    from fingerprint.io.gradients import read_bvals_bvecs

    info = json.loads((reference_dir / "schemes" / "hcp.json").read_text())
    return read_bvals_bvecs(reference_dir / "schemes" / "hcp.bval",
                            reference_dir / "schemes" / "hcp.bvec",
                            delta=info["delta_s"][0], Delta=info["Delta_s"][0])


@pytest.fixture(scope="module")
def noddi_store(hcp_scheme, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "noddi.zarr"
    return build_dictionary("noddi", hcp_scheme, path, size=SIZE, seed=3, chunk_atoms=CHUNK)


@pytest.fixture()
def store_copy(noddi_store, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(noddi_store.path, path)
    return path


@pytest.fixture()
def count_simulations(monkeypatch):
    calls = []
    original = build_module.simulate_atoms

    def counting(model, scheme, parameters):
        calls.append(len(parameters))
        return original(model, scheme, parameters)

    monkeypatch.setattr(build_module, "simulate_atoms", counting)
    return calls


def _rewrite_attrs(path: Path, change, *, fix_checksum: bool) -> None:
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta["attributes"])
    if fix_checksum:
        meta["attributes"]["checksum"] = attrs_checksum(meta["attributes"])
    meta_file.write_text(json.dumps(meta))


# ------------------------------------------------------------------ content
def test_stored_atoms_equal_the_forward_model(noddi_store, hcp_scheme):
    d = open_dictionary(noddi_store.path)  # reopen from disk
    model = get_model("noddi")
    assert d.parameter_names == list(model.parameter_names)
    assert d.name == "noddi" and len(d) == SIZE
    assert d.signals.shape == (SIZE, hcp_scheme.number_of_measurements)
    assert d.parameters.shape == (SIZE, 6)
    assert d.signals.dtype == np.float32 and d.parameters.dtype == np.float64
    assert d.signals.chunks[0] == CHUNK
    rows = np.sort(np.random.default_rng(0).choice(SIZE, 25, replace=False))
    params = d.read_parameters()[rows]
    expected = np.asarray(model.simulate_signal(hcp_scheme, params))
    np.testing.assert_allclose(d.read_signals()[rows], expected, rtol=1e-6, atol=1e-7)
    # canonical frame, fractions on the simplex, odi in its range
    assert d.canonical_orientation
    np.testing.assert_array_equal(params[:, :2], 0.0)
    np.testing.assert_allclose(params[:, 4] + params[:, 5], 1.0)
    assert params[:, 2].min() >= 0.02 and params[:, 2].max() <= 0.99
    # features are the feature map's, of the stored signals
    from fingerprint.fitting.features import FEATURES_VERSION, FeatureMap

    fmap = FeatureMap.from_model(model, hcp_scheme)
    np.testing.assert_allclose(d.read_features()[rows],
                               fmap.atom_features(d.read_signals()[rows]), rtol=1e-5,
                               atol=1e-6)
    assert d.features_version == FEATURES_VERSION
    # the model and scheme rebuild exactly
    assert d.model.spec_hash == model.spec_hash
    assert list(d.model.parameter_names) == d.parameter_names
    assert d.scheme.hash == hcp_scheme.hash
    np.testing.assert_array_equal(d.scheme.bvalues, hcp_scheme.bvalues)
    m = d.metadata
    assert m["scheme_hash"] == hcp_scheme.hash and m["sampling"]["seed"] == 3
    assert m["format_version"] == 1 and m["complete"] is True
    assert m["checksum"] == attrs_checksum(m)
    d.verify()


def test_same_seed_same_atoms_other_seed_other_atoms(noddi_store, hcp_scheme, tmp_path):
    again = build_dictionary("noddi", hcp_scheme, tmp_path / "a.zarr", size=SIZE, seed=3,
                             chunk_atoms=700)
    np.testing.assert_array_equal(again.read_parameters(), noddi_store.read_parameters())
    np.testing.assert_array_equal(again.read_signals(), noddi_store.read_signals())
    assert again.key == noddi_store.key
    other = build_dictionary("noddi", hcp_scheme, tmp_path / "b.zarr", size=SIZE, seed=4)
    assert other.key != noddi_store.key
    assert not np.allclose(other.read_parameters(), noddi_store.read_parameters())


def test_dictionary_pickles_as_its_path(noddi_store):
    import pickle

    clone = pickle.loads(pickle.dumps(noddi_store))
    assert clone.path == noddi_store.path and clone.key == noddi_store.key


# ------------------------------------------------------------------ validation
def test_open_is_lazy_and_damaged_chunks_fail_when_read(store_copy):
    chunk = store_copy / "signals" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    chunk.write_bytes(bytes(data))
    d = open_dictionary(store_copy)  # metadata and file sizes only: opens
    d.read_signals(0, CHUNK)  # intact chunk
    with pytest.raises(DictionaryError, match="corrupt"):
        d.read_signals(CHUNK, 2 * CHUNK)
    with pytest.raises(DictionaryError):
        d.verify()


def test_truncated_chunk_is_refused(store_copy):
    chunk = store_copy / "features" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(DictionaryError, match="truncated"):
        open_dictionary(store_copy)


def test_missing_chunk_is_refused(store_copy):
    os.remove(store_copy / "parameters" / "c" / "0" / "0")
    with pytest.raises(DictionaryError, match="missing"):
        open_dictionary(store_copy)


def test_missing_array_is_refused(store_copy):
    shutil.rmtree(store_copy / "features")
    with pytest.raises(DictionaryError, match="features"):
        open_dictionary(store_copy)


def test_corrupt_metadata_is_refused(store_copy):
    _rewrite_attrs(store_copy, lambda a: a.update(n_atoms=10), fix_checksum=False)
    with pytest.raises(DictionaryError, match="checksum"):
        open_dictionary(store_copy)
    (store_copy / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    with pytest.raises(DictionaryError, match="corrupt"):
        open_dictionary(store_copy)


def test_incomplete_store_is_refused(store_copy):
    _rewrite_attrs(store_copy, lambda a: a.update(complete=False), fix_checksum=True)
    with pytest.raises(DictionaryError, match="incomplete"):
        open_dictionary(store_copy)


def test_wrong_format_version_is_refused(store_copy):
    _rewrite_attrs(store_copy, lambda a: a.update(format_version=99), fix_checksum=True)
    with pytest.raises(DictionaryError, match="format version 99"):
        open_dictionary(store_copy)


def test_features_version_mismatch_is_refused(store_copy):
    _rewrite_attrs(store_copy, lambda a: a.update(features_version=a["features_version"] + 1),
                   fix_checksum=True)
    with pytest.raises(DictionaryError, match="features version"):
        open_dictionary(store_copy)


def test_foreign_and_missing_paths_are_refused(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    group.attrs["hello"] = "world"
    group.create_array("signals", shape=(4, 4), dtype="float32")
    with pytest.raises(DictionaryError, match="not a fingerprint dictionary"):
        open_dictionary(tmp_path / "other.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DictionaryError, match="no zarr.json"):
        open_dictionary(tmp_path / "plain")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(DictionaryError, match="not a dictionary"):
        open_dictionary(tmp_path / "file.zarr")
    with pytest.raises(DictionaryError, match="does not exist"):
        open_dictionary(tmp_path / "nowhere.zarr")


# ------------------------------------------------------------------ cache
def test_cache_hit_does_not_simulate(hcp_scheme, tmp_path, count_simulations):
    first = get_or_build_dictionary("noddi", hcp_scheme, size=800, seed=1,
                                    directory=tmp_path, chunk_atoms=CHUNK)
    assert sum(count_simulations) == 800
    count_simulations.clear()
    progress = []
    again = get_or_build_dictionary("noddi", hcp_scheme, size=800, seed=1,
                                    directory=tmp_path, progress=progress.append)
    assert count_simulations == [] and progress == [1.0]
    assert again.path == first.path and again.key == first.key
    # the same model given as an object (equal to the recipe) hits the same entry
    again = get_or_build_dictionary(get_model("noddi"), hcp_scheme, size=800, seed=1,
                                    directory=tmp_path)
    assert count_simulations == [] and again.path == first.path
    # anything else is another dictionary
    get_or_build_dictionary("noddi", hcp_scheme, size=801, seed=1, directory=tmp_path)
    assert sum(count_simulations) == 801
    entries = list_dictionaries(tmp_path)
    assert [e["atoms"] for e in entries] == [800, 801]
    assert all(e["valid"] and e["name"] == "noddi" for e in entries)


def test_default_directory_comes_from_the_environment(hcp_scheme, monkeypatch, tmp_path):
    monkeypatch.setenv("FINGERPRINT_DICTIONARY_DIR", str(tmp_path / "dicts"))
    assert default_dictionary_dir() == tmp_path / "dicts"
    d = get_or_build_dictionary("noddi", hcp_scheme, size=64)
    assert d.path.parent == tmp_path / "dicts"


def test_damaged_cache_entry_is_rebuilt(hcp_scheme, tmp_path, count_simulations):
    d = get_or_build_dictionary("noddi", hcp_scheme, size=300, directory=tmp_path)
    os.remove(d.path / "signals" / "c" / "0" / "0")
    count_simulations.clear()
    again = get_or_build_dictionary("noddi", hcp_scheme, size=300, directory=tmp_path)
    assert sum(count_simulations) == 300 and again.path == d.path
    again.verify()


def test_explicit_path_is_never_clobbered_silently(hcp_scheme, tmp_path):
    target = tmp_path / "mine.zarr"
    build_dictionary("noddi", hcp_scheme, target, size=100)
    with pytest.raises(DictionaryError, match="different or damaged"):
        build_dictionary("noddi", hcp_scheme, target, size=120)
    assert open_dictionary(target).n_atoms == 100
    assert build_dictionary("noddi", hcp_scheme, target, size=120, overwrite=True).n_atoms == 120
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DictionaryError, match="not a fingerprint dictionary"):
        build_dictionary("noddi", hcp_scheme, foreign, size=100, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_unwritable_directory_is_an_input_error(hcp_scheme, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot create the dictionary directory"):
        build_dictionary("noddi", hcp_scheme, blocker / "sub" / "d.zarr", size=10)


def test_cancelled_build_leaves_nothing(hcp_scheme, tmp_path):
    calls = []

    def cancel_after_first_chunk():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError):
        build_dictionary("noddi", hcp_scheme, tmp_path / "c.zarr", size=3 * CHUNK,
                         chunk_atoms=CHUNK, should_cancel=cancel_after_first_chunk)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]


def test_timing_is_required_for_restricted_models(hcp_scheme, reference_dir):
    from fingerprint.io.gradients import read_bvals_bvecs

    no_timing = read_bvals_bvecs(reference_dir / "schemes" / "hcp.bval",
                                 reference_dir / "schemes" / "hcp.bvec")
    with pytest.raises(InputError, match="needs pulse timing"):
        get_or_build_dictionary("activeax", no_timing, size=10)


# ------------------------------------------------------------------ concurrency
_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import fingerprint.dictionary.build as B
    from fingerprint.dictionary import get_or_build_dictionary
    from fingerprint.io.gradients import read_bvals_bvecs

    marker, directory, size, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    scheme = read_bvals_bvecs({bval!r}, {bvec!r}, delta={delta!r}, Delta={Delta!r})
    simulated = []
    original = B.simulate_atoms
    def counting(model, scheme, parameters):
        simulated.append(len(parameters))
        return original(model, scheme, parameters)
    B.simulate_atoms = counting

    calls = []
    def progress(fraction):
        calls.append(fraction)
        if mode == "hang" and len(calls) == 2:  # the first chunk is on disk by now
            marker.write_text("started")
            time.sleep(120)
        if mode == "slow" and 0 < fraction < 1:
            time.sleep(0.2)

    d = get_or_build_dictionary("noddi", scheme, size=size, directory=directory,
                                progress=progress, chunk_atoms=256)
    print(json.dumps({{"path": str(d.path), "simulated": sum(simulated)}}))
""")


def _child_script(tmp_path: Path, reference_dir: Path) -> Path:
    info = json.loads((reference_dir / "schemes" / "hcp.json").read_text())
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(REPO_ROOT),
                                    bval=str(reference_dir / "schemes" / "hcp.bval"),
                                    bvec=str(reference_dir / "schemes" / "hcp.bvec"),
                                    delta=float(info["delta_s"][0]),
                                    Delta=float(info["Delta_s"][0])))
    return script


@pytest.mark.slow
def test_killed_build_never_leaves_a_complete_looking_store(tmp_path, reference_dir,
                                                            hcp_scheme):
    script = _child_script(tmp_path, reference_dir)
    directory = tmp_path / "dicts"
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(directory), "1024",
                             "hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "child never started building"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # only a hidden temporary with partial data remains; nothing opens or lists
    leftovers = [p.name for p in directory.iterdir() if p.name != ".locks"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and ".tmp-" in leftovers[0]
    assert list_dictionaries(directory) == []
    assert any((directory / leftovers[0]).rglob("c/0/0"))  # it really was mid-build
    # the next builder cleans up and builds
    d = get_or_build_dictionary("noddi", hcp_scheme, size=1024, directory=directory)
    assert d.n_atoms == 1024
    assert sorted(p.name for p in directory.iterdir()) == sorted([".locks", d.path.name])


@pytest.mark.slow
def test_concurrent_builders_build_once(tmp_path, reference_dir):
    script = _child_script(tmp_path, reference_dir)
    directory = tmp_path / "dicts"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "m"),
                               str(directory), "1024", "slow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["simulated"] for r in results) == [0, 1024]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [".locks", Path(results[0]["path"]).name])
    open_dictionary(results[0]["path"]).verify()


def test_racing_builders_without_lock_keep_one_store(hcp_scheme, tmp_path, monkeypatch):
    """Without the lock the atomic rename decides: the loser discards its copy."""
    import contextlib

    monkeypatch.setattr(build_module, "build_lock", lambda target: contextlib.nullcontext())
    barrier = threading.Barrier(2)
    original = build_module._install

    def install_together(*args, **kwargs):
        barrier.wait(timeout=60)
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "_install", install_together)
    results, errors = [], []

    def run():
        try:
            results.append(get_or_build_dictionary("noddi", hcp_scheme, size=200,
                                                   directory=tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results[0].path == results[1].path
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].path.name]
    results[0].verify()
