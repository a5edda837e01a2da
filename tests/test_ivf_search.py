"""The inverted-file search kernel of the matcher (fingerprint.kernels.neighbours)."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.fitting.matcher import IVF_NPROBE, IVFTables, Matcher, _ivf_lists
from fingerprint.kernels.neighbours import ivf_search


def _family(n: int, seed: int, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Atoms on a curved 3-parameter family in 12 features (like a dictionary's), and
    noisy queries near it."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(3, 12))
    atoms = np.tanh(rng.uniform(0, 1, (n, 3)) @ basis).astype(np.float32)
    queries = np.tanh(rng.uniform(0, 1, (700, 3)) @ basis) + rng.normal(0, noise, (700, 12))
    return atoms, queries


def _exact(atoms: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest by (squared distance, index), in float64."""
    d = ((queries[:, None, :].astype(np.float64) - atoms[None].astype(np.float64)) ** 2).sum(2)
    order = np.lexsort((np.broadcast_to(np.arange(atoms.shape[0]), d.shape), d), axis=1)
    idx = order[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def _tables(atoms: np.ndarray, n_lists: int, seed: int = 0) -> IVFTables:
    """Tables with lists from a few rounds of Lloyd's k-means (no FAISS needed)."""
    rng = np.random.default_rng(seed)
    centroids = atoms[rng.choice(atoms.shape[0], n_lists, replace=False)].astype(np.float64)
    for _ in range(5):
        assign = ((atoms[:, None, :] - centroids[None]) ** 2).sum(2).argmin(1)
        for c in range(n_lists):
            if (assign == c).any():
                centroids[c] = atoms[assign == c].mean(0)
    assign = ((atoms[:, None, :] - centroids[None]) ** 2).sum(2).argmin(1)
    return IVFTables.from_lists(atoms, centroids, assign)


def test_probing_every_list_is_the_exact_search():
    """With every list probed the kernel returns the exact k nearest, sorted by distance
    (float32 distances equal to float64 ones to rounding)."""
    atoms, queries = _family(3000, 1)
    tables = _tables(atoms, 40)
    de, ie = _exact(atoms, queries, 32)
    for q in (queries, queries.astype(np.float32)):
        d, i = tables.search(q, 32, tables.n_lists)
        assert d.dtype == np.float32 and i.dtype == np.int64
        np.testing.assert_array_equal(i, ie)
        np.testing.assert_allclose(d, de, rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(d, axis=1) >= 0)


def test_probing_fewer_lists_finds_the_nearest_in_the_nearest_lists():
    """Probing p lists returns exactly the k nearest atoms among the members of the p
    lists whose centroids are nearest the query."""
    atoms, queries = _family(3000, 2, noise=0.05)
    tables = _tables(atoms, 40)
    centroids = tables.centroids_t.T.astype(np.float64)  # rotated, sorted by key
    rotated = (queries - tables.mean) @ tables.rotation
    members = [tables.ids[tables.list_start[c]:tables.list_start[c + 1]]
               for c in range(tables.n_lists)]
    d, i = tables.search(queries, 8, 3)
    for r in range(0, queries.shape[0], 7):
        near = np.argsort(((rotated[r] - centroids) ** 2).sum(1), kind="stable")[:3]
        pool = np.sort(np.concatenate([members[c] for c in near]))
        dp, ip = _exact(atoms[pool], queries[r:r + 1], 8)
        np.testing.assert_array_equal(i[r], pool[ip[0]])
        np.testing.assert_allclose(d[r], dp[0], rtol=1e-5, atol=1e-6)


def test_ties_are_broken_by_atom_index_and_missing_neighbours_are_marked():
    """Equal distances come in atom order whatever the list layout; fewer atoms than k
    give -1 / inf; a non-finite query finds nothing."""
    atoms = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # each point three times
    tables = IVFTables.from_lists(atoms, np.eye(4), np.repeat(np.arange(4), 3)[::-1])
    d, i = tables.search(np.array([[1.0, 0, 0, 0], [np.nan, 0, 0, 0]]), 14, 4)
    np.testing.assert_array_equal(i[0, :3], [0, 1, 2])
    np.testing.assert_array_equal(i[0, 12:], [-1, -1])
    assert np.all(np.isinf(d[0, 12:])) and np.all(d[0, :3] == 0)
    np.testing.assert_array_equal(i[1], -1)
    # many atoms at one distance (more than the selection's slack): the lowest indices
    many = np.zeros((60, 4), dtype=np.float32)
    many[::2, 0] = 1.0
    tables = IVFTables.from_lists(many, np.eye(2, 4), np.zeros(60, dtype=np.int64))
    d, i = tables.search(np.array([[0.5, 0, 0, 0]]), 5, 1)
    np.testing.assert_array_equal(i[0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(d[0], 0.25)


def test_results_do_not_depend_on_batching_or_threads():
    """Each query is searched alone: any split of the queries, the serial and the parallel
    version give bit-identical results."""
    atoms, queries = _family(4000, 3)
    tables = _tables(atoms, 48)
    queries = np.tile(queries, (4, 1))  # 2800 queries: above the serial threshold
    args = (4, tables.mean, tables.rotation, tables.centroids_t, tables.key,
            tables.atoms_t, tables.list_start, tables.ids, 16)
    dp, ip = ivf_search(queries, 16, *args)
    ds, is_ = ivf_search.serial(queries, 16, *args)
    np.testing.assert_array_equal(ip, is_)
    np.testing.assert_array_equal(dp, ds)
    parts = [ivf_search.serial(queries[a:a + 333], 16, *args) for a in range(0, 2800, 333)]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ip)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), dp)
    # a narrow first window is widened to the same nearest lists
    narrow = ivf_search.serial(queries, 16, *args[:-1], 1)
    np.testing.assert_array_equal(narrow[1], ip)


def test_matcher_search_equals_faiss_on_the_same_lists(tmp_path):
    """The matcher's inverted-file search finds what FAISS's IndexIVFFlat finds when
    probing the same lists, and writes/reads the index in the cache once."""
    faiss = pytest.importorskip("faiss")
    atoms, queries = _family(6000, 4)
    cache = tmp_path / "store.zarr.hnsw16.faiss"
    m = Matcher(atoms, method="auto", hnsw_threshold=1000, cache_path=cache)
    d, i = m.search(queries, 32)
    index = faiss.read_index(str(tmp_path / f"store.zarr.ivf{_ivf_lists(6000)}.faiss"))
    params = faiss.SearchParametersIVF()
    params.nprobe = IVF_NPROBE
    df, if_ = index.search(queries.astype(np.float32), 32, params=params)
    same = np.mean([set(a) == set(b) for a, b in zip(i, if_, strict=True)])
    assert same >= 0.99  # rows differ only where rounding reorders near-equal distances
    np.testing.assert_allclose(d, df, rtol=1e-3, atol=1e-5)
    assert m._hnsw is None  # wide searches never read or build the graph
    assert not cache.exists()
