"""Nearest-neighbour search of voxel features among dictionary atoms (FAISS).

Below ``hnsw_threshold`` atoms (100,000 by default) the search is exact
(``IndexFlatL2``: a brute-force BLAS distance computation). Above it, an HNSW graph
(``IndexHNSWFlat``) answers queries in logarithmic time; its ``ef_search`` is chosen so
that the recall of the k nearest neighbours against the exact search is at least 0.99
(tests/test_fitting_engine.py measures it). An HNSW graph of a stored dictionary is built
once and cached beside it (``<store>.hnsw<M>.faiss``, written to a temporary file and
renamed into place, so concurrent builders never see a partial file); a cache that cannot
be written (read-only directory) only costs the rebuild.

Searching is read-only on the index and thread-safe; per-call search parameters are
passed explicitly, never set on the shared index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.errors import DictionaryError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_HNSW_THRESHOLD", "Matcher", "faiss_threads"]

#: Number of atoms from which the approximate (HNSW) index is used.
DEFAULT_HNSW_THRESHOLD = 100_000
#: HNSW graph degree, construction and search beam widths.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 32
#: Queries per FAISS call (bounds the distance buffers of the exact search).
QUERY_BATCH = 16384


@contextlib.contextmanager
def faiss_threads(n_jobs: int | None):
    """Temporarily set FAISS's OpenMP thread count (process-wide) to ``n_jobs``."""
    if not n_jobs:
        yield
        return
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n_jobs)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _hnsw_cache_path(store: Path) -> Path:
    return store.parent / f"{store.name}.hnsw{HNSW_M}.faiss"


class Matcher:
    """k-nearest-neighbour search over ``features`` (atoms, k) float32.

    Parameters
    ----------
    features: atom features.
    method: ``'auto'`` (exact below ``hnsw_threshold`` atoms, HNSW above), ``'exact'`` or
        ``'hnsw'``.
    hnsw_threshold: atoms from which ``'auto'`` uses HNSW.
    ef_search: HNSW search beam (larger: higher recall, slower).
    index: a prebuilt FAISS index over ``features`` (e.g. read from the cache).
    """

    def __init__(self, features: np.ndarray, *, method: str = "auto",
                 hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
                 ef_search: int = HNSW_EF_SEARCH, index: Any = None):
        import faiss

        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise DictionaryError(f"cannot index features of shape {feats.shape}")
        if method == "auto":
            method = "hnsw" if feats.shape[0] >= int(hnsw_threshold) else "exact"
        if method not in ("exact", "hnsw"):
            raise ValueError(f"unknown matcher method {method!r}; use 'auto', 'exact' or "
                             "'hnsw'")
        self.method = method
        self.n_atoms, self.dimension = feats.shape
        self.ef_search = int(ef_search)
        if index is None:
            if method == "exact":
                index = faiss.IndexFlatL2(self.dimension)
            else:
                index = faiss.IndexHNSWFlat(self.dimension, HNSW_M)
                index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.add(feats)
        self.index = index

    # ------------------------------------------------------------ dictionaries
    @classmethod
    def for_dictionary(cls, dictionary: Any, features: np.ndarray | None = None, *,
                       method: str = "auto", hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
                       ef_search: int = HNSW_EF_SEARCH, cache: bool = True) -> Matcher:
        """Matcher over a stored dictionary's features; an HNSW graph is read from (or
        written to) the cache file beside the store."""
        import faiss

        feats = dictionary.read_features() if features is None else features
        n = int(feats.shape[0])
        if method == "auto":
            method = "hnsw" if n >= int(hnsw_threshold) else "exact"
        if method != "hnsw" or not cache or getattr(dictionary, "path", None) is None:
            return cls(feats, method=method, ef_search=ef_search)
        path = _hnsw_cache_path(Path(dictionary.path))
        if path.exists():
            try:
                index = faiss.read_index(str(path))
                if index.ntotal == n and index.d == feats.shape[1]:
                    logger.info("using cached HNSW index %s", path)
                    return cls(feats, method="hnsw", ef_search=ef_search, index=index)
                logger.warning("cached HNSW index %s does not match the dictionary; "
                               "rebuilding it", path)
            except Exception as exc:  # unreadable cache: rebuild
                logger.warning("cannot read cached HNSW index %s (%s); rebuilding it", path,
                               exc)
        matcher = cls(feats, method="hnsw", ef_search=ef_search)
        matcher.save(path)
        return matcher

    def save(self, path: str | os.PathLike) -> bool:
        """Write the index atomically (temporary file + rename); False when impossible."""
        import faiss

        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
        except OSError as exc:
            logger.info("not caching the HNSW index in %s: %s", path.parent, exc)
            return False
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
            logger.info("cached HNSW index %s", path)
            return True
        except Exception as exc:
            logger.warning("could not cache the HNSW index at %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    # ------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) float32 and atom indices (n, k) int64 (-1 when
        fewer than k atoms) of the k nearest atoms of every query (n, dim)."""
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise ValueError(f"queries must have shape (n, {self.dimension}), got {q.shape}")
        k = int(max(1, min(k, self.n_atoms)))
        n = q.shape[0]
        dist = np.empty((n, k), dtype=np.float32)
        idx = np.empty((n, k), dtype=np.int64)
        params = None
        if self.method == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(ef_search or self.ef_search), k)
        for start in range(0, n, QUERY_BATCH):
            stop = min(n, start + QUERY_BATCH)
            if params is None:
                d, i = self.index.search(q[start:stop], k)
            else:
                d, i = self.index.search(q[start:stop], k, params=params)
            dist[start:stop] = d
            idx[start:stop] = i
        return dist, idx
