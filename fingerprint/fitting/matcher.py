"""Nearest-neighbour search of voxel features among dictionary atoms (FAISS).

Below ``hnsw_threshold`` atoms (100,000 by default) the search is exact
(``IndexFlatL2``: a brute-force BLAS distance computation). Above it, an HNSW graph
(``IndexHNSWFlat``) answers queries in logarithmic time; its ``ef_search`` is chosen so
that the recall of the k nearest neighbours against the exact search is at least 0.99
(tests/test_fitting_engine.py measures it). An HNSW graph of a stored dictionary is built
once, when a query batch first needs it (small batches, such as a one-slice volume, are
searched exactly: that is quicker than building the graph), and cached beside it
(``<store>.hnsw<M>.faiss``, written to a temporary file and renamed into place, so
concurrent builders never see a partial file); a cache that cannot be written (read-only
directory) only costs the rebuild.

Searches for many neighbours (at least :data:`IVF_MIN_K`, the main match), and any
search given a number of lists to probe (the estimator's profile match and its
dictionary-spacing estimate), on an HNSW-sized dictionary use an inverted file instead of
the graph (about 96 atoms per list, 5 lists probed by default): on the NODDI dictionary it
finds the 32 nearest atoms with recall 0.996. Its lists are those of a FAISS
``IndexIVFFlat`` trained once (k-means with a fixed seed) when first needed and cached
beside the store (``<store>.ivf<lists>.faiss``) like the graph; the search itself runs on
:class:`IVFTables` made from it (:func:`fingerprint.kernels.neighbours.ivf_search`: the same
lists, the same recall, about 0.4 of FAISS's CPU time for the main match), so a fit that
only makes such searches never reads the HNSW graph. Quick matches without ``nprobe`` use
the graph with a beam width.

Searching is read-only on the index and thread-safe; per-call search parameters are
passed explicitly, never set on the shared index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.errors import DictionaryError

if TYPE_CHECKING:
    import faiss

    from fingerprint.dictionary.store import Dictionary

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_HNSW_THRESHOLD", "IVFTables", "Matcher", "faiss_threads"]

#: Number of atoms from which the approximate (HNSW) index is used.
DEFAULT_HNSW_THRESHOLD = 100_000
#: HNSW graph degree, construction and search beam widths.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 32
#: Searches for at least this many neighbours use an inverted-file index (IVF) instead of
#: the HNSW graph once the search is approximate: on the 100,000-atom NODDI dictionary
#: (12 features) an IVF of 1,024 lists probed 8 at a time finds the 32 nearest atoms with
#: recall 1.000 (HNSW 0.9998) in 0.6 of the HNSW's CPU time.
IVF_MIN_K = 16
#: Atoms per IVF list (about; at most IVF_MAX_LISTS lists) and lists probed per query by
#: default: on the NODDI dictionary (recall of the 32 nearest against the exact search,
#: FAISS CPU µs per query on one core) 8 lists 0.9996 / 10.9, 6 lists 0.9988 / 9.3,
#: 5 lists 0.9960 / 8.6, 4 lists 0.9857 / 8.0; with 5 instead of 8 the NODDI benchmark
#: MAEs move by less than 1e-5.
IVF_ATOMS_PER_LIST = 96
IVF_MAX_LISTS = 1024
IVF_NPROBE = 5
#: Centroids either side of a query's position (on the first principal axis) measured
#: first by the inverted-file search (widened until no other centroid can be nearer).
IVF_WINDOW = 16
#: Queries per FAISS call (bounds the distance buffers of the exact search).
QUERY_BATCH = 16384
#: With ``method='auto'``, a matcher answers its first atoms / this queries exactly while no
#: HNSW graph is at hand (see :attr:`Matcher.exact_below`).
EXACT_QUERY_FRACTION = 32


@contextlib.contextmanager
def faiss_threads(n_jobs: int | None):
    """Temporarily set FAISS's OpenMP thread count (process-wide) to ``n_jobs``."""
    if not n_jobs:
        yield
        return
    import faiss  # lazy: keeps FAISS off import

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n_jobs)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _hnsw_cache_path(store: Path) -> Path:
    return store.parent / f"{store.name}.hnsw{HNSW_M}.faiss"


def _ivf_lists(n_atoms: int) -> int:
    return int(min(IVF_MAX_LISTS, max(1, n_atoms // IVF_ATOMS_PER_LIST)))


def _ivf_cache_path(hnsw_cache: Path, n_atoms: int) -> Path:
    store = hnsw_cache.name[: -len(f".hnsw{HNSW_M}.faiss")]
    return hnsw_cache.parent / f"{store}.ivf{_ivf_lists(n_atoms)}.faiss"


@dataclass(frozen=True)
class IVFTables:
    """An inverted file laid out for :func:`fingerprint.kernels.neighbours.ivf_search`.

    Features are rotated onto their principal axes (x -> (x - ``mean``) @ ``rotation``,
    an orthogonal change of basis: distances are unchanged); ``centroids_t`` (d, lists)
    float32 holds the rotated list centroids sorted by their first coordinate (``key``),
    ``atoms_t`` (d, atoms) float32 the rotated atoms grouped by list (list l in columns
    ``list_start[l]:list_start[l + 1]``), ``ids`` their atom indices. All arrays are
    read-only."""

    mean: np.ndarray
    rotation: np.ndarray
    centroids_t: np.ndarray
    key: np.ndarray
    atoms_t: np.ndarray
    list_start: np.ndarray
    ids: np.ndarray

    @classmethod
    def from_lists(cls, features: np.ndarray, centroids: np.ndarray,
                   assignment: np.ndarray) -> IVFTables:
        """Tables of ``features`` (atoms, d) grouped into the lists of ``centroids``
        (lists, d): atom i belongs to list ``assignment[i]``."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.shape[0] >= 2 ** 31:  # the search's sort keys hold atom indices in 32 bits
            raise DictionaryError(f"cannot index {feats.shape[0]} atoms (at most 2**31 - 1)")
        n_lists = int(centroids.shape[0])
        mean = feats.mean(axis=0)
        centred = feats - mean
        _, vectors = np.linalg.eigh(centred.T @ centred)
        rotation = np.ascontiguousarray(vectors[:, ::-1])  # largest variance first
        rotated_centroids = (np.asarray(centroids, dtype=np.float64) - mean) @ rotation
        by_key = np.argsort(rotated_centroids[:, 0], kind="stable")
        rank = np.empty(n_lists, dtype=np.int64)
        rank[by_key] = np.arange(n_lists)
        lists = rank[np.asarray(assignment, dtype=np.int64)]
        ids = np.argsort(lists, kind="stable").astype(np.int64)
        list_start = np.searchsorted(lists[ids], np.arange(n_lists + 1)).astype(np.int64)
        atoms_t = np.ascontiguousarray((centred[ids] @ rotation).T, dtype=np.float32)
        centroids_t = np.ascontiguousarray(rotated_centroids[by_key].T, dtype=np.float32)
        tables = cls(mean, rotation, centroids_t, np.ascontiguousarray(centroids_t[0]),
                     atoms_t, list_start, ids)
        for arr in (tables.mean, tables.rotation, tables.centroids_t, tables.key,
                    tables.atoms_t, tables.list_start, tables.ids):
            arr.setflags(write=False)
        return tables

    @classmethod
    def from_faiss(cls, index: faiss.Index, features: np.ndarray) -> IVFTables:
        """Tables with the lists of a FAISS ``IndexIVFFlat`` over ``features``."""
        import faiss  # lazy: keeps FAISS off import

        ivf = faiss.extract_index_ivf(index)
        n_lists = int(ivf.nlist)
        centroids = ivf.quantizer.reconstruct_n(0, n_lists)
        assignment = np.full(int(ivf.ntotal), -1, dtype=np.int64)
        invlists = ivf.invlists
        if invlists is None:
            raise DictionaryError("the IVF index has no inverted lists")
        for lst in range(n_lists):
            size = int(invlists.list_size(lst))
            if size:
                members = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
                assignment[np.asarray(members, dtype=np.int64)] = lst
        if (assignment < 0).any():
            raise DictionaryError("the IVF index does not hold every atom")
        return cls.from_lists(features, centroids, assignment)

    @property
    def n_lists(self) -> int:
        return int(self.centroids_t.shape[1])

    def search(self, queries: np.ndarray, k: int, nprobe: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (n, k) float32 and atom indices (n, k) int64 of the k nearest
        atoms in the ``nprobe`` nearest lists of each query (n, d) (float32 or float64)."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.neighbours import ivf_search

        q = queries if queries.dtype in (np.float32, np.float64) else \
            queries.astype(np.float64)
        q = np.ascontiguousarray(q)
        nprobe = int(min(max(1, nprobe), self.n_lists))
        return run_parallel(ivf_search, q, int(k), nprobe, self.mean, self.rotation,
                            self.centroids_t, self.key, self.atoms_t, self.list_start,
                            self.ids, IVF_WINDOW)


class Matcher:
    """k-nearest-neighbour search over ``features`` (atoms, k) float32.

    Parameters
    ----------
    features: atom features.
    method: ``'auto'`` (exact below ``hnsw_threshold`` atoms, HNSW above, with small query
        batches answered exactly, see :attr:`exact_below`), ``'exact'`` or ``'hnsw'``.
    hnsw_threshold: atoms from which ``'auto'`` uses HNSW.
    ef_search: HNSW search beam (larger: higher recall, slower).
    index: a prebuilt FAISS index over ``features`` (e.g. read from the cache).
    cache_path: where ``'auto'`` reads or writes its HNSW graph when it first needs one.

    Attributes
    ----------
    method: the search used for large query batches (``'exact'`` or ``'hnsw'``).
    exact_below: with ``'auto'`` over an HNSW-sized dictionary, ``atoms //
        EXACT_QUERY_FRACTION``: while no approximate index is at hand (an HNSW graph or
        an inverted file, in memory or cached beside the store), the matcher's first
        queries, up to this many in all, are searched exactly, so a small volume (the
        demo, one slice) is matched at once; the index a search needs is built (and
        cached) as soon as more are asked for, and once one exists every batch, large or
        small, is searched on the approximate indexes (results do not depend on how
        voxels are batched).
    """

    def __init__(self, features: np.ndarray, *, method: str = "auto",
                 hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
                 ef_search: int = HNSW_EF_SEARCH, index: faiss.Index | None = None,
                 cache_path: str | os.PathLike | None = None):
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise DictionaryError(f"cannot index features of shape {feats.shape}")
        lazy = method == "auto" and index is None
        if method == "auto":
            method = "hnsw" if feats.shape[0] >= int(hnsw_threshold) else "exact"
        if method not in ("exact", "hnsw"):
            raise ValueError(f"unknown matcher method {method!r}; use 'auto', 'exact' or "
                             "'hnsw'")
        self.method = method
        self.n_atoms, self.dimension = feats.shape
        self.ef_search = int(ef_search)
        self._features = feats
        self._cache_path = None if cache_path is None else Path(cache_path)
        self._lock = threading.Lock()
        self._flat: Any = None
        self._hnsw: Any = None
        self._ivf: Any = None
        self._exact_queries = 0
        self.exact_below = self.n_atoms // EXACT_QUERY_FRACTION \
            if (lazy and method == "hnsw") else 0
        if method == "exact":
            self._flat = index if index is not None else self._build_flat()
        elif index is not None:
            self._hnsw = index
        elif not lazy:
            self._hnsw = self._load_or_build_hnsw()

    def _build_flat(self) -> Any:
        import faiss  # lazy: keeps FAISS off import

        index = faiss.IndexFlatL2(self.dimension)
        index.add(self._features)
        return index

    def _read_cached_index(self, path: Path | None, kind: str) -> Any:
        """The ``kind`` index cached at ``path`` when it exists, is readable and matches the
        dictionary (atom count and dimension), else None (logged: it is rebuilt)."""
        import faiss  # lazy: keeps FAISS off import

        if path is None or not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:  # unreadable cache: rebuild
            logger.warning("cannot read cached %s index %s (%s); rebuilding it", kind, path,
                           exc)
            return None
        if index.ntotal == self.n_atoms and index.d == self.dimension:
            logger.info("using cached %s index %s", kind, path)
            return index
        logger.warning("cached %s index %s does not match the dictionary; rebuilding it",
                       kind, path)
        return None

    def _load_or_build_hnsw(self) -> Any:
        """The HNSW graph: read from :attr:`_cache_path` when valid, else built (and
        written there)."""
        import faiss  # lazy: keeps FAISS off import

        path = self._cache_path
        cached = self._read_cached_index(path, "HNSW")
        if cached is not None:
            return cached
        logger.info("building the HNSW index of %d atoms (once per dictionary)", self.n_atoms)
        index = faiss.IndexHNSWFlat(self.dimension, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(self._features)
        self._hnsw = index
        if path is not None:
            self.save(path)
        return index

    def _load_or_build_ivf(self) -> Any:
        """The IVF index of wide searches (:data:`IVF_MIN_K`): read from the cache beside
        the HNSW graph's when valid, else trained (k-means with a fixed seed: the same
        lists in every process) and written there."""
        # lazy: keeps FAISS off import
        import faiss

        path = None if self._cache_path is None else \
            _ivf_cache_path(self._cache_path, self.n_atoms)
        cached = self._read_cached_index(path, "IVF")
        if cached is not None:
            return cached
        n_lists = _ivf_lists(self.n_atoms)
        logger.info("building the IVF index of %d atoms in %d lists (once per dictionary)",
                    self.n_atoms, n_lists)
        quantizer = faiss.IndexFlatL2(self.dimension)
        index = faiss.IndexIVFFlat(quantizer, self.dimension, n_lists)
        index.cp.seed = 1234
        index.cp.niter = 20
        index.train(self._features)
        index.add(self._features)
        self._ivf_quantizer = quantizer  # the index refers to it: keep it alive
        if path is not None:
            self._save_index(index, path)
        return index

    def _wide_index(self) -> IVFTables:
        """The inverted file's search tables (the FAISS index is read or trained, then
        only its lists are kept)."""
        if self._ivf is None:
            with self._lock:
                if self._ivf is None:
                    self._ivf = IVFTables.from_faiss(self._load_or_build_ivf(),
                                                     self._features)
        return self._ivf

    @property
    def atom_order(self) -> np.ndarray | None:
        """Atom indices in the inverted file's list order (atoms of one list next to each
        other, read-only), once its tables are loaded; else None. The neighbours a search
        returns lie in a few lists: tables of per-atom values laid out in this order are
        read from a few memory regions instead of scattered rows."""
        tables = self._ivf
        return None if tables is None else tables.ids

    @property
    def index(self) -> faiss.Index:
        """The FAISS index of large query batches (an HNSW graph is built on first use)."""
        return self._index_for(self.exact_below)

    def _index_for(self, n_queries: int, exact: bool | None = None) -> Any:
        """The FAISS index of a batch of ``n_queries`` (exact: the flat index; else the
        HNSW graph); ``exact`` when already decided for this batch."""
        if exact is None:
            exact = self.method == "exact" or self._answer_exactly(n_queries)
        if exact:
            if self._flat is None:
                with self._lock:
                    if self._flat is None:
                        self._flat = self._build_flat()
            return self._flat
        if self._hnsw is None:
            with self._lock:
                if self._hnsw is None:
                    self._hnsw = self._load_or_build_hnsw()
        return self._hnsw

    def _answer_exactly(self, n_queries: int) -> bool:
        """Whether an ``'auto'`` matcher without a graph at hand answers these queries
        exactly (counted against :attr:`exact_below`)."""
        if self._hnsw is not None or self._ivf is not None or self.exact_below == 0:
            return False
        if self._cache_path is not None and (
                self._cache_path.exists()
                or _ivf_cache_path(self._cache_path, self.n_atoms).exists()):
            return False
        with self._lock:
            if self._exact_queries + n_queries >= self.exact_below:
                return False
            self._exact_queries += n_queries
            return True

    # ------------------------------------------------------------ dictionaries
    @classmethod
    def for_dictionary(cls, dictionary: Dictionary, features: np.ndarray | None = None, *,
                       method: str = "auto", hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
                       ef_search: int = HNSW_EF_SEARCH, cache: bool = True) -> Matcher:
        """Matcher over a stored dictionary's features; an HNSW graph is read from (or
        written to) the cache file beside the store: at once with ``method='hnsw'``, at
        the first large query batch with ``'auto'``."""
        feats = dictionary.read_features() if features is None else features
        n = int(feats.shape[0])
        resolved = method
        if method == "auto":
            resolved = "hnsw" if n >= int(hnsw_threshold) else "exact"
        path = getattr(dictionary, "path", None)
        cache_path = _hnsw_cache_path(Path(path)) if (cache and path is not None) else None
        if resolved != "hnsw":
            return cls(feats, method=resolved, ef_search=ef_search)
        return cls(feats, method=method, hnsw_threshold=hnsw_threshold, ef_search=ef_search,
                   cache_path=cache_path)

    def save(self, path: str | os.PathLike) -> bool:
        """Write the index atomically (temporary file + rename); False when impossible."""
        return self._save_index(self.index, path)

    @staticmethod
    def _save_index(index: Any, path: str | os.PathLike) -> bool:
        # lazy: keeps FAISS off import
        import faiss

        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
        except OSError as exc:
            logger.info("not caching the search index in %s: %s", path.parent, exc)
            return False
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, path)
            logger.info("cached search index %s", path)
            return True
        except Exception as exc:
            logger.warning("could not cache the search index at %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    # ------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) float32 and atom indices (n, k) int64 (-1 when
        fewer than k atoms) of the k nearest atoms of every query (n, dim).

        On an approximate (HNSW-sized) dictionary, searches for at least
        :data:`IVF_MIN_K` neighbours, or any search given ``nprobe``, use the inverted
        file probing ``nprobe`` lists (default :data:`IVF_NPROBE`); others the HNSW graph
        with beam ``ef_search`` (default the matcher's). Exact matchers ignore both."""
        import faiss  # lazy: keeps FAISS off import

        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(f"queries must have shape (n, {self.dimension}), got "
                             f"{queries.shape}")
        k = int(max(1, min(k, self.n_atoms)))
        n = queries.shape[0]
        exact = self.method == "exact" or self._answer_exactly(n)
        if not exact and (k >= IVF_MIN_K or nprobe is not None):
            # float32 or float64 queries go to the kernel as they are (no copy)
            return self._wide_index().search(queries, k, int(nprobe or IVF_NPROBE))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dist = np.empty((n, k), dtype=np.float32)
        idx = np.empty((n, k), dtype=np.int64)
        index = self._index_for(n, exact)
        params = None
        if index is self._hnsw:
            params = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009 - untyped module
            params.efSearch = max(int(ef_search or self.ef_search), k)
        for start in range(0, n, QUERY_BATCH):
            stop = min(n, start + QUERY_BATCH)
            if params is None:
                d, i = index.search(q[start:stop], k)
            else:
                d, i = index.search(q[start:stop], k, params=params)
            dist[start:stop] = d
            idx[start:stop] = i
        return dist, idx
