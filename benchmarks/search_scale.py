"""Similar-case search at scale: the approximate sub-index an :class:`midol_hub.ImageIndex`
builds above its exact limit, against exact search, on synthetic vectors of midol-micro's
dimension (256).

The vectors are a mixture of 2,000 Gaussian clusters on the unit sphere (embeddings of an
archive cluster by patient, device and finding), not uniform noise, on which no index beats
exact search; queries are perturbed copies of indexed vectors.
"""

from __future__ import annotations

import time

import numpy as np

from midol_hub.search import build_faiss_index, recall_at_k, unit_rows


def synthetic(size: int, dim: int, clusters: int = 2000, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    vectors = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, 100_000):  # in chunks: the noise of 10^6 rows at once would double peak memory
        stop = min(size, start + 100_000)
        vectors[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        vectors[start:stop] += spread * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return unit_rows(vectors)


def measure(size: int = 1_000_000, dim: int = 256, queries: int = 1000) -> dict[str, float]:
    vectors = synthetic(size, dim)
    rng = np.random.default_rng(1)
    probe = unit_rows(vectors[rng.integers(0, size, queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32))
    start = time.perf_counter()
    exact, _ = build_faiss_index(vectors, exact_limit=size)
    exact_build = time.perf_counter() - start
    start = time.perf_counter()
    approximate, built = build_faiss_index(vectors, exact_limit=size - 1)
    approximate_build = time.perf_counter() - start
    start = time.perf_counter()
    _, truth = exact.search(probe, 10)
    exact_query = (time.perf_counter() - start) / queries
    start = time.perf_counter()
    _, found = approximate.search(probe, 10)
    approximate_query = (time.perf_counter() - start) / queries
    recall = recall_at_k(truth, found)
    return {
        "ann_recall_at_10": recall,
        "ann_query_speedup_ratio": exact_query / approximate_query,
        "ann_build_seconds": approximate_build,
        "exact_build_seconds": exact_build,
        "exact_query_ms": 1e3 * exact_query,
        "ann_query_ms": 1e3 * approximate_query,
        "ann_bytes_per_vector": (4 * dim + 8),  # IVF-Flat stores each vector and its id; exact stores the vector
        "exact_bytes_per_vector": 4 * dim,
        "ann_vectors": size,
        "ann_nprobe": built["nprobe"],
        "ann_lists": built["lists"],
    }
