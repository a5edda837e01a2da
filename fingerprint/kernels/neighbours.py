"""Numba kernel of the inverted-file nearest-neighbour search of the matcher.

An inverted file (IVF) groups the dictionary's atoms into lists around coarse centroids;
a query probes its ``nprobe`` nearest lists and keeps the ``k`` nearest atoms found there.
:func:`ivf_search` runs that search on tables laid out for it
(:class:`fingerprint.fitting.matcher.IVFTables`):

* features rotated onto their principal axes (an orthogonal change of basis: distances
  are unchanged), centroids sorted by the first axis, so that the nearest lists are found
  from a window of centroids around the query's position on that axis (widened until no
  centroid outside it can be nearer; the result is that of a search of every centroid);
* each list's atoms stored dimension by dimension, so that the distances of a list are
  vectorised loops over contiguous memory;
* the k smallest distances of the probed lists selected by bisecting a bound on the k-th
  (vectorised counts), then sorting the few items below it as integer keys that order
  by (distance, atom).

The k nearest are ordered by (distance, atom index), so ties never depend on the order
in which lists or atoms are visited; queries are independent of each other, so results
do not depend on how they are batched or on the thread count. Distances are float32
squared Euclidean distances, as FAISS computes them.
"""

from __future__ import annotations

import numpy as np

from fingerprint.kernels import njit, parallel_kernel, prange

__all__ = ["ivf_search"]

#: Below this many queries :func:`ivf_search` runs its serial twin.
SERIAL_ROWS = 2048
#: Queries per parallel work item (each item allocates its scratch once).
QUERY_BLOCK = 256
#: The k-smallest selection sorts at most this many items more than k.
_SLACK = 8


@njit(cache=True, nogil=True)
def _nearest_lists(q: np.ndarray, centroids_t: np.ndarray, key: np.ndarray, window: int,
                   cdist: np.ndarray, pd: np.ndarray, pl: np.ndarray) -> None:
    """The ``pd.size`` nearest centroids of the rotated query ``q`` (ascending by distance,
    then index) into ``pd`` (distances) and ``pl`` (centroid indices; -1 when there are
    fewer centroids)."""
    nl = centroids_t.shape[1]
    dim = centroids_t.shape[0]
    nprobe = pd.shape[0]
    inf = np.float32(np.inf)
    for j in range(nprobe):
        pd[j] = inf
        pl[j] = -1
    pw = inf
    pos = np.searchsorted(key, q[0])
    a0 = max(pos - window, 0)
    a1 = min(pos + window, nl)
    done_lo = a0
    done_hi = a0
    while True:
        seg = cdist[a0:a1]
        seg[:] = 0
        for t in range(dim):
            qt = q[t]
            row = centroids_t[t, a0:a1]
            for c in range(a1 - a0):
                e = qt - row[c]
                seg[c] += e * e
        for c in range(a0, a1):
            d = cdist[c]
            if d < pw or (d == pw and c < pl[nprobe - 1]):
                j = nprobe - 1
                while j > 0 and (pd[j - 1] > d or (pd[j - 1] == d and pl[j - 1] > c)):
                    pd[j] = pd[j - 1]
                    pl[j] = pl[j - 1]
                    j -= 1
                pd[j] = d
                pl[j] = c
                pw = pd[nprobe - 1]
        if a0 < done_lo:
            done_lo = a0
        else:
            done_hi = a1
        # a centroid outside [done_lo, done_hi) is at least its first-axis gap away
        if done_lo > 0:
            e = q[0] - key[done_lo - 1]
            if e * e <= pw:
                a1 = done_lo
                a0 = max(done_lo - window, 0)
                continue
        if done_hi < nl:
            e = key[done_hi] - q[0]
            if e * e <= pw:
                a0 = done_hi
                a1 = min(done_hi + window, nl)
                continue
        break


@njit(cache=True, nogil=True)
def _count_at_most(dist: np.ndarray, m: int, bound: float) -> int:
    """How many of ``dist[:m]`` are at most ``bound`` (a vectorised count)."""
    count = 0
    for s in range(m):
        count += dist[s] <= bound
    return count


@njit(cache=True, nogil=True)
def _k_smallest(dist: np.ndarray, bits: np.ndarray, place: np.ndarray, ids: np.ndarray,
                m: int, k: int, keys: np.ndarray) -> int:
    """The k smallest of ``dist[:m]`` (fewer when m < k) as ascending keys in ``keys``:
    (float32 bits of the distance << 32) | atom ``ids[place[i]]``, so that one integer
    comparison orders by (distance, atom) (non-negative floats order as their bits).
    Returns how many.

    A bound above the k-th smallest is bisected (vectorised counts) until at most
    :data:`_SLACK` more than k items lie below it; only those are sorted."""
    n = 0
    if m > k + _SLACK:
        high = dist[0]  # the largest of any k items is at least the k-th smallest
        for s in range(1, k):
            high = max(high, dist[s])
        low = np.float32(0.0)
        above = _count_at_most(dist, m, high)
        for _ in range(64):
            if above <= k + _SLACK:
                break
            mid = np.float32(0.5) * (low + high)
            if not low < mid < high:
                break
            count = _count_at_most(dist, m, mid)
            if count >= k:
                high = mid
                above = count
            else:
                low = mid
        for s in range(m):
            keys[n] = (np.int64(bits[s]) << 32) | ids[place[s]]
            n += dist[s] <= high
    else:
        for s in range(m):
            keys[s] = (np.int64(bits[s]) << 32) | ids[place[s]]
        n = m
    for a in range(1, n):  # insertion sort of the few keys left
        v = keys[a]
        j = a
        while j > 0 and keys[j - 1] > v:
            keys[j] = keys[j - 1]
            j -= 1
        keys[j] = v
    return min(n, k)


@njit(cache=True, nogil=True)
def _search_block(queries: np.ndarray, start: int, stop: int, k: int, nprobe: int,
                  mean: np.ndarray, rotation: np.ndarray, centroids_t: np.ndarray,
                  key: np.ndarray, atoms_t: np.ndarray, list_start: np.ndarray,
                  ids: np.ndarray, window: int, out_d: np.ndarray,
                  out_i: np.ndarray) -> None:
    dim = atoms_t.shape[0]
    nl = centroids_t.shape[1]
    longest = 0
    for l in range(nl):
        longest = max(longest, list_start[l + 1] - list_start[l])
    q = np.empty(dim, np.float32)
    cdist = np.empty(nl, np.float32)
    buf = np.empty(max(longest * nprobe, 1), np.float32)
    place = np.empty(buf.shape[0], np.int64)
    bits = buf.view(np.int32)
    keys = np.empty(buf.shape[0], np.int64)
    word = np.empty(1, np.int32)
    word_f = word.view(np.float32)
    pd = np.empty(nprobe, np.float32)
    pl = np.empty(nprobe, np.int64)
    for r in range(start, stop):
        finite = True
        for a in range(dim):
            acc = 0.0
            for b in range(dim):
                acc += (float(queries[r, b]) - mean[b]) * rotation[b, a]
            q[a] = acc
            finite = finite and np.isfinite(acc)
        found = 0
        if finite:
            _nearest_lists(q, centroids_t, key, window, cdist, pd, pl)
            m = 0
            for p in range(nprobe):
                lst = pl[p]
                if lst < 0:
                    continue
                s0 = list_start[lst]
                size = list_start[lst + 1] - s0
                dist = buf[m:m + size]
                dist[:] = 0
                for t in range(dim):
                    qt = q[t]
                    row = atoms_t[t, s0:s0 + size]
                    for s in range(size):
                        e = qt - row[s]
                        dist[s] += e * e
                for s in range(size):
                    place[m + s] = s0 + s
                m += size
            found = _k_smallest(buf, bits, place, ids, m, k, keys)
            for j in range(found):
                word[0] = np.int32(keys[j] >> 32)
                out_d[r, j] = word_f[0]
                out_i[r, j] = keys[j] & 0xFFFFFFFF
        for j in range(found, k):
            out_d[r, j] = np.inf
            out_i[r, j] = -1


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def ivf_search(queries: np.ndarray, k: int, nprobe: int, mean: np.ndarray,
               rotation: np.ndarray, centroids_t: np.ndarray, key: np.ndarray,
               atoms_t: np.ndarray, list_start: np.ndarray, ids: np.ndarray,
               window: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest atoms of each query among the ``nprobe`` nearest lists.

    ``queries`` (n, d) float32 or float64 features; ``mean`` (d,) and ``rotation`` (d, d)
    float64 map a feature vector x to (x - mean) @ rotation; ``centroids_t`` (d, lists)
    float32 rotated centroids sorted by their first coordinate ``key`` (lists,);
    ``atoms_t`` (d, atoms) float32 rotated atoms grouped by list (list l holds columns
    ``list_start[l]:list_start[l + 1]``), ``ids`` (atoms,) their atom indices; ``window``
    centroids either side of the query's position are measured first.

    Returns squared distances (n, k) float32 and atom indices (n, k) int64, ascending by
    (distance, index); inf / -1 where fewer than k atoms were found or the query is not
    finite."""
    n = queries.shape[0]
    out_d = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    blocks = (n + QUERY_BLOCK - 1) // QUERY_BLOCK
    for b in prange(blocks):
        _search_block(queries, b * QUERY_BLOCK, min(n, (b + 1) * QUERY_BLOCK), k, nprobe,
                      mean, rotation, centroids_t, key, atoms_t, list_start, ids, window,
                      out_d, out_i)
    return out_d, out_i
