"""The first run on a machine: serial twins for small batches, exact matching of small
volumes (no HNSW graph built for them), and one INFO line while kernels compile."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

import fingerprint.kernels as kernels
from fingerprint.fitting.matcher import EXACT_QUERY_FRACTION, Matcher
from fingerprint.kernels import parallel_kernel, prange, run_parallel
from fingerprint.kernels.features import weighted_rows


@parallel_kernel(serial_rows=8)
def _row_sums(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0])
    for i in prange(x.shape[0]):
        out[i] = x[i].sum()
    return out


def test_small_batches_run_the_serial_twin_only() -> None:
    small = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(run_parallel(_row_sums, small), small.sum(axis=1))
    assert len(_row_sums.serial.signatures) == 1
    assert len(_row_sums.signatures) == 0  # the parallel version was never compiled
    large = np.arange(60.0).reshape(20, 3)
    # a large fitting batch runs in parallel at once (compiled once per machine, cached)
    np.testing.assert_array_equal(run_parallel(_row_sums, large), large.sum(axis=1))
    assert len(_row_sums.signatures) == 1
    np.testing.assert_array_equal(_row_sums(large), _row_sums.serial(large))


@parallel_kernel()
def _row_means(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0])
    for i in prange(x.shape[0]):
        out[i] = x[i].mean()
    return out


def test_large_work_stays_serial_until_a_serial_run_proves_slow(monkeypatch) -> None:
    """Dictionary builds (run_kernel / run_large): serial while the parallel code is not at
    hand and serial runs are quick, parallel once one was slow."""
    monkeypatch.setattr(kernels, "_parallel_available", lambda kernel: False)
    large = np.arange(60.0).reshape(20, 3)
    np.testing.assert_array_equal(kernels.run_large(_row_means, _row_means.serial, large),
                                  large.mean(axis=1))
    assert len(_row_means.signatures) == 0
    monkeypatch.setattr(kernels, "SLOW_SERIAL_SECONDS", 0.0)  # now every serial run is slow
    kernels.run_large(_row_means, _row_means.serial, large)
    assert len(_row_means.signatures) == 0  # that run was serial, and judged slow
    np.testing.assert_array_equal(kernels.run_large(_row_means, _row_means.serial, large),
                                  large.mean(axis=1))
    assert len(_row_means.signatures) == 1  # so the next large batch ran in parallel


def test_auto_matcher_searches_small_batches_exactly(tmp_path) -> None:
    rng = np.random.default_rng(0)
    atoms = rng.random((4000, 6)).astype(np.float32)
    cache = tmp_path / "store.zarr.hnsw16.faiss"
    auto = Matcher(atoms, method="auto", hnsw_threshold=1000, cache_path=cache)
    exact = Matcher(atoms, method="exact")
    assert auto.method == "hnsw" and auto.exact_below == 4000 // EXACT_QUERY_FRACTION
    small = rng.random((auto.exact_below - 1, 6)).astype(np.float32)
    d_auto, i_auto = auto.search(small, 5)
    d_exact, i_exact = exact.search(small, 5)
    np.testing.assert_array_equal(i_auto, i_exact)
    np.testing.assert_allclose(d_auto, d_exact, rtol=1e-5)
    assert not cache.exists()  # no graph was needed
    large = rng.random((auto.exact_below, 6)).astype(np.float32)
    _, i_large = auto.search(large, 5)
    assert cache.exists()  # built (and cached) for the first large batch
    _, i_large_exact = exact.search(large, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i_large, i_large_exact,
                                                                 strict=True)])
    assert recall >= 0.95
    again = Matcher(atoms, method="auto", hnsw_threshold=1000, cache_path=cache)
    np.testing.assert_array_equal(again.search(large, 5)[1], i_large)
    # once the graph exists, small batches are searched on it too: a volume's last, short
    # chunk is matched like the others, and results do not depend on the batching
    graph_small = again.search(small, 5)[1]
    np.testing.assert_array_equal(auto.search(small, 5)[1], graph_small)
    np.testing.assert_array_equal(again.search(large[:10], 5)[1], i_large[:10])


def test_auto_matcher_builds_its_graph_once_small_batches_add_up(tmp_path) -> None:
    rng = np.random.default_rng(1)
    atoms = rng.random((4000, 6)).astype(np.float32)
    cache = tmp_path / "store.zarr.hnsw16.faiss"
    auto = Matcher(atoms, method="auto", hnsw_threshold=1000, cache_path=cache)
    batch = rng.random((auto.exact_below // 2 + 1, 6)).astype(np.float32)
    auto.search(batch, 5)
    assert not cache.exists()  # the first small batch is answered exactly
    auto.search(batch, 5)
    assert cache.exists()  # the second one reaches exact_below: the graph is built


def test_first_compilation_is_announced_once(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(kernels, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(kernels, "_cache_failure_logged", False)
    announcer = kernels._CompileAnnouncer()
    ours = SimpleNamespace(data={"dispatcher": SimpleNamespace(py_func=weighted_rows.py_func)})
    theirs = SimpleNamespace(data={"dispatcher": SimpleNamespace(py_func=np.sum)})
    with caplog.at_level(logging.INFO, logger="fingerprint.kernels"):
        announcer.on_start(theirs)
        assert not caplog.records  # numba's own helpers are not announced
        announcer.on_start(ours)
        announcer.on_start(ours)
    assert [r.getMessage() for r in caplog.records if "first run on this machine" in
            r.getMessage() and "(one-off" in r.getMessage()] and len(caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fingerprint.kernels"):
        kernels._CompileAnnouncer().on_start(ours)  # a later run: the marker is there
    assert "not used before on this machine" in caplog.text


def test_deferred_blocks_keep_large_batches_serial_until_slow(monkeypatch) -> None:
    """Dictionary builds compute atom features inside defer_parallel: no parallel
    compilation on a first run unless a serial batch proved slow."""
    monkeypatch.setattr(kernels, "_parallel_available", lambda kernel: False)

    @parallel_kernel(serial_rows=8)
    def row_max(x: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape[0])
        for i in prange(x.shape[0]):
            out[i] = x[i].max()
        return out

    large = np.arange(60.0).reshape(20, 3)
    with kernels.defer_parallel():
        np.testing.assert_array_equal(run_parallel(row_max, large), large.max(axis=1))
    assert len(row_max.signatures) == 0  # deferred: serial
    np.testing.assert_array_equal(run_parallel(row_max, large), large.max(axis=1))
    assert len(row_max.signatures) == 1  # outside the block: parallel at once
