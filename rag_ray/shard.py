"""One FAISS shard: vectors, index and passage payload for a slice of the corpus.

``IndexShard`` is plain Python (testable without Ray); the Ray actor around it is made at the
edge (:mod:`rag_ray.shards`). While the corpus streams in, a shard spills its rows to local disk
(raw fp32 vectors appended to one file, passages as Parquet row groups), so memory stays flat
however large the corpus. :meth:`finalize` then sorts the rows by ``passage_id`` (the same corpus
always gives byte-identical shard files, whatever order Ray Data delivered the rows in), trains
IVF-PQ on a sample, and adds the vectors in chunks while writing the fp16 stored vectors straight
to a memory-mapped file: the peak is the FAISS index itself plus one chunk.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from rag_ray.errors import RagRayError
from rag_ray.io import atomic_path, sha256_file
from rag_ray.lexical import LazyBm25

IndexType = Literal["flat", "hnsw", "ivfpq"]
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
SHARD_FILES = ("index.faiss", "vectors.npy", "passages.parquet")
PASSAGE_COLUMNS = ("passage_id", "doc_id", "title", "text")
#: Below this many vectors a shard cannot train an IVF-PQ quantizer worth having.
MIN_IVFPQ_VECTORS = 1000
#: Flat search uses BLAS (one pass over the vectors per batch) from this many queries on.
BLAS_THRESHOLD = 1
#: Rows per chunk while finalize adds vectors to FAISS (64 Ki x 384 fp32 = 96 MiB).
ADD_CHUNK = 65536


class IndexShard:
    """Passages + their vectors + a FAISS inner-product index over them.

    Search returns shard-local row numbers and scores; :meth:`fetch` turns winning rows into
    payload (ids, titles, texts, stored vectors) so only the merged top-k cross the network.

    IVF-PQ shards re-rank ``refine`` x k candidates by their exact inner product with the stored
    fp16 vectors, which PQ codes alone would rank only approximately.

    :meth:`lexical_search` ranks the same passages by BM25 (an index built from the passages on
    the first lexical query, so nothing more is saved); :meth:`hybrid_search` returns both
    candidate lists, with the q·d of the BM25 hits so the client scores them like dense hits.

    ``threads`` is the shard's OpenMP budget for FAISS (search and build); None leaves the
    process default (a Ray actor without CPUs gets 1). ``spill_dir`` is where rows wait for
    :meth:`finalize` (default: the system temp directory of the node).

    With ``restore_from`` the constructor loads (and checksums against ``files``) a saved shard,
    so an actor that Ray restarts after a crash comes back complete, never empty.
    """

    def __init__(self, dim: int, index_type: IndexType = "flat", hnsw_m: int = 32, ef_search: int = 128,
                 ivf_nlist: int | None = None, pq_m: int | None = None, nprobe: int = 16, refine: int = 64,
                 seed: int = 0, threads: int | None = None, spill_dir: str | None = None,
                 restore_from: str | os.PathLike | None = None, files: dict[str, dict] | None = None) -> None:
        if index_type not in INDEX_TYPES:
            raise RagRayError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if dim < 1:
            raise RagRayError(f"dim must be >= 1, got {dim}")
        if index_type == "ivfpq" and pq_m is not None and dim % pq_m:
            raise RagRayError(f"pq_m={pq_m} must divide the vector dimension {dim}")
        if threads is not None and threads < 1:
            raise RagRayError(f"threads must be >= 1, got {threads}")
        self.dim, self.index_type = dim, index_type
        if refine < 1:
            raise RagRayError(f"refine must be >= 1, got {refine}")
        self.hnsw_m, self.ef_search, self.ivf_nlist, self.pq_m, self.nprobe, self.refine, self.seed = (
            hnsw_m, ef_search, ivf_nlist, pq_m, nprobe, refine, seed)
        self.threads, self.spill_dir = threads, spill_dir
        self._spill: _Spill | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None  # finalized files not yet saved
        self.index: faiss.Index | None = None
        self.passages = _empty_passages()
        self.vectors = np.zeros((0, dim), dtype=np.float16)
        self.directory: str | None = None
        self._bm25 = LazyBm25()
        # a build actor takes several add() calls at once: each batch's passages and vectors must
        # land in the spill files together, at the same rows
        self._add_lock = threading.Lock()
        if restore_from is not None:
            self.restore(restore_from, files)

    # ------------------------------------------------------------------ build
    def add(self, passage_ids, doc_ids, titles, texts, vectors: np.ndarray) -> int:
        """Spill a batch of rows to local disk; returns how many rows the shard has received."""
        import pyarrow as pa

        vectors = np.asarray(vectors, dtype=np.float32)
        n = len(passage_ids)
        if vectors.ndim != 2 or vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {vectors.shape}")
        if not (len(doc_ids) == len(titles) == len(texts) == n):
            raise ValueError("passage_ids, doc_ids, titles and texts must have the same length")
        if self.index is not None:
            raise RuntimeError("shard is already finalized; build a new shard to add rows")
        columns = (passage_ids, doc_ids, titles, texts)
        table = pa.table({name: pa.array([str(x) for x in col], pa.string()) for name, col in zip(PASSAGE_COLUMNS, columns)})
        with self._add_lock:
            if self._spill is None:  # IVF-PQ is lossy anyway: its rows wait in fp16, half the disk
                dtype = np.float16 if self.index_type == "ivfpq" else np.float32
                self._spill = _Spill(self.dim, self.spill_dir, dtype)
            return self._spill.append(table, vectors)

    def discard(self) -> None:
        """Delete what a build left on local disk (spilled rows, unsaved stored vectors): a build
        that fails or is interrupted must not leave gigabytes in the node's temp directory."""
        with self._add_lock:
            spill, self._spill = self._spill, None
        if spill is not None:
            spill.close_quietly()
            spill.cleanup()
        if self._scratch is not None:
            self.vectors = np.zeros((0, self.dim), dtype=np.float16)  # unmap before deleting
            self._scratch.cleanup()
            self._scratch = None

    def finalize(self, threads: int | None = None) -> int:
        """Sort the spilled rows by passage id and build the FAISS index; returns the row count.

        ``threads`` overrides the shard's FAISS threads for the build (a build that runs one shard
        of a node at a time can use all the node's cores).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.index is not None:
            raise RuntimeError("shard is already finalized")
        self._set_threads(threads or self.threads)
        spill, self._spill = self._spill, None
        table, spilled = spill.close() if spill is not None else (_empty_passages(), np.zeros((0, self.dim), np.float16))
        n = table.num_rows
        order = pc.sort_indices(table.column("passage_id")).to_numpy().astype(np.int64) if n else np.zeros(0, np.int64)
        table = table.take(pa.array(order)).combine_chunks() if n else table
        pids = table.column("passage_id")
        if n > 1:
            same = pc.equal(pids.slice(1), pids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            if same.any():
                dup = pids[int(np.argmax(same))].as_py()
                raise RagRayError(f"duplicate passage_id {dup!r}: document ids must be unique across the corpus")
        self._scratch = tempfile.TemporaryDirectory(prefix="rag_ray_shard_", dir=self.spill_dir)
        out_path = Path(self._scratch.name) / "vectors.npy"
        index = self._new_index(n, lambda positions: spilled[order[positions]])
        if n:
            stored = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16, shape=(n, self.dim))
            for start in range(0, n, ADD_CHUNK):
                chunk = np.ascontiguousarray(spilled[order[start : start + ADD_CHUNK]], dtype=np.float32)
                index.add(chunk)
                stored[start : start + len(chunk)] = chunk
            stored.flush()
            del stored
        else:  # numpy cannot memory-map an empty array
            _save_npy(out_path, np.zeros((0, self.dim), np.float16))
        spilled = None  # unmap before the spill file goes
        if spill is not None:
            spill.cleanup()
        self.passages = table
        self._bm25.reset()
        self.vectors = _load_npy(out_path)
        self._tune(index)
        self.index = index
        return n

    def _new_index(self, n: int, sample_rows) -> faiss.Index:
        """An empty index, trained (IVF-PQ) on a seeded sample of rows in sorted order."""
        if self.index_type == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
            return index
        if n < MIN_IVFPQ_VECTORS:
            raise RagRayError(f"ivfpq needs at least {MIN_IVFPQ_VECTORS} vectors per shard to train, "
                             f"this shard has {n}; use --index-type flat or hnsw, or fewer shards")
        nlist = self.ivf_nlist or max(1, min(4 * int(math.sqrt(n)), n // 39))
        m = self.pq_m or next(m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim) if m and self.dim % m == 0)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(self.seed)
        positions = np.sort(rng.choice(n, size=min(n, max(256 * 40, nlist * 40)), replace=False))
        index.train(np.ascontiguousarray(sample_rows(positions), dtype=np.float32))
        return index

    def _tune(self, index: faiss.Index) -> None:
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe

    def tune(self, nprobe: int | None = None, ef_search: int | None = None, refine: int | None = None) -> None:
        """Change search-time parameters of a live shard (speed against recall); no rebuild."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("refine", refine)):
            if value is not None:
                if value < 1:
                    raise RagRayError(f"{name} must be >= 1, got {value}")
                setattr(self, name, int(value))
        if self.index is not None:
            self._tune(self.index)

    def _set_threads(self, threads: int | None) -> None:
        """FAISS threads for this call. OpenMP keeps the count per calling thread, and an actor
        serves calls from a thread pool, so it is set on every call, not once. Flat search also
        goes through BLAS from the first query: faiss-cpu 1.15 ships a threshold of 128,000
        queries below which it scans once per query, 3-7x slower at batches of 16-64 over 1M
        vectors here, and no faster for a single query (docs/benchmarks.md)."""
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        if threads:
            faiss.omp_set_num_threads(threads)

    # ------------------------------------------------------------------ query
    def __len__(self) -> int:
        return self.passages.num_rows

    @property
    def passage_ids(self) -> list[str]:
        return self.passages.column("passage_id").to_pylist()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[B, D] float32 -> (scores [B, k'], local rows [B, k']), k' = min(k, shard size); -1 = empty."""
        if self.index is None:
            raise RuntimeError("shard is not finalized: call finalize() or load() before search()")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (batch, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, len(self))
        if kk == 0:
            b = len(queries)
            return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
        self._set_threads(self.threads)
        if self.index_type != "ivfpq" or self.refine == 1:
            return self.index.search(queries, kk)
        _, rows = self.index.search(queries, min(len(self), kk * self.refine))
        return self._rerank(queries, rows, kk)

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact q·d over the stored vectors of the candidate rows; the top k of them."""
        scores = self._dots(queries, rows)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores, top_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
        top_scores[top_rows < 0] = -np.inf
        return top_scores.astype(np.float32), top_rows

    def _dots(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """q·d [B, L] of each query with the vectors of its rows [B, L] (-inf where row -1): the
        fp32 vectors the index holds (flat, hnsw: the scores its search gives), else (ivfpq) the
        stored fp16 ones its re-ranking uses."""
        safe = np.where(rows < 0, 0, rows)
        order = np.argsort(safe, axis=None)  # read the memory-mapped rows in file order
        flat = np.empty((safe.size, self.dim), np.float32)
        if self.index_type == "ivfpq":
            flat[order] = self.vectors[safe.ravel()[order]]
        elif safe.size:
            flat[order] = self.index.reconstruct_batch(np.ascontiguousarray(safe.ravel()[order], dtype=np.int64))
        scores = np.einsum("bkd,bd->bk", flat.reshape(*rows.shape, self.dim), queries)
        scores[rows < 0] = -np.inf
        return scores.astype(np.float32)

    def lexical_search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Question strings -> BM25 (scores [B, k'], local rows [B, k']) over "title text" of this
        shard's passages; -1 = empty (rows that share no term with the question are left out)."""
        if self.index is None:
            raise RuntimeError("shard is not finalized: call finalize() or load() before lexical_search()")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._bm25.get(self.passages).search(questions, k)

    def hybrid_search(self, queries: np.ndarray, questions: list[str], k: int,
                      lexical_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dense top-k and BM25 top-``lexical_k`` for the same queries: (scores, rows, BM25 scores,
        BM25 rows, q·d of the BM25 rows [B, l']); the client fuses them (lexical.merge_hybrid)."""
        if len(questions) != len(queries):
            raise RagRayError(f"got {len(questions)} questions for {len(queries)} query vectors; give one per query")
        scores, rows = self.search(queries, k)
        lex_scores, lex_rows = self.lexical_search(questions, lexical_k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return scores, rows, lex_scores, lex_rows, self._dots(queries, lex_rows)

    def hybrid_search_payload(self, queries: np.ndarray, questions: list[str], k: int, lexical_k: int,
                              vectors: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """``hybrid_search`` plus the payload of every row either list returns (one round trip)."""
        found = self.hybrid_search(queries, questions, k, lexical_k)
        unique = sorted({int(r) for r in found[1][found[1] >= 0]} | {int(r) for r in found[3][found[3] >= 0]})
        return (*found, {"rows": unique, **self.fetch(unique, vectors)})

    def search_payload(self, queries: np.ndarray, k: int, vectors: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
        """``search`` plus the payload of every row it returns (``fetch`` of the unique rows, with
        a ``rows`` list saying which): one round trip instead of two, for small batches where the
        extra payload costs less than a second call."""
        scores, rows = self.search(queries, k)
        unique = sorted({int(r) for r in rows[rows >= 0]})
        return scores, rows, {"rows": unique, **self.fetch(unique, vectors)}

    def fetch(self, rows: list[int], vectors: bool = True) -> dict:
        """Payload for local rows: ids, doc ids, titles, texts and (unless ``vectors`` is False)
        the stored vectors (fp16)."""
        import pyarrow as pa

        picked = self.passages.take(pa.array(rows, pa.int64()))
        out = {name: picked.column(name).to_pylist() for name in PASSAGE_COLUMNS}
        out["vectors"] = np.asarray(self.vectors[rows]) if vectors else None
        return out

    def stats(self) -> dict:
        """Size and placement (the Ray node id when running as an actor)."""
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover
            pass
        import resource

        return {"passages": len(self), "index_type": self.index_type, "dim": self.dim, "node_id": node,
                "directory": self.directory, "pid": os.getpid(), "threads": self.threads,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> dict[str, dict]:
        """Write the shard's files into ``directory`` (each written aside, then renamed);
        returns {file: {sha256, bytes}} for the manifest. The stored vectors finalize wrote are
        moved, not copied, when they are on the same file system."""
        import pyarrow.parquet as pq

        if self.index is None:
            raise RuntimeError("finalize() the shard before save()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        scratch_vectors = Path(self._scratch.name) / "vectors.npy" if self._scratch is not None else None

        def write_vectors(tmp: Path) -> None:
            if scratch_vectors is not None and scratch_vectors.is_file():
                shutil.move(scratch_vectors, tmp)
            else:
                _save_npy(tmp, self.vectors)

        writers = {
            "index.faiss": lambda p: faiss.write_index(self.index, str(p)),
            "vectors.npy": write_vectors,
            "passages.parquet": lambda p: pq.write_table(self.passages, p),
        }
        files = {}
        for name, write in writers.items():
            with atomic_path(directory / name) as tmp:
                write(tmp)
            files[name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        if scratch_vectors is not None:
            self.vectors = _load_npy(directory / "vectors.npy")
            self._scratch.cleanup()
            self._scratch = None
        return files

    @classmethod
    def load(cls, directory: str | os.PathLike, dim: int, index_type: IndexType, files: dict[str, dict] | None = None,
             **params) -> "IndexShard":
        return cls(dim, index_type, restore_from=directory, files=files, **params)

    def restore(self, directory: str | os.PathLike, files: dict[str, dict] | None = None,
                mmap_vectors: bool = True) -> int:
        """Replace this shard's contents with the files in ``directory``; returns the row count.

        A missing file, or one whose sha256 differs from the manifest's ``files``, is a RagRayError
        naming the file: a corrupted index must never answer queries.
        """
        import pyarrow.parquet as pq

        directory = Path(directory)
        for name in SHARD_FILES:
            path = directory / name
            if not path.is_file():
                raise RagRayError(f"index file missing: {path}")
            if files is not None:
                expected = files.get(name, {}).get("sha256")
                actual = sha256_file(path)
                if expected != actual:
                    raise RagRayError(f"index file corrupted: {path} has sha256 {actual[:12]}..., "
                                     f"the manifest says {str(expected)[:12]}...; rebuild the index")
        try:
            index = faiss.read_index(str(directory / "index.faiss"))
            vectors = _load_npy(directory / "vectors.npy", mmap_vectors)
            table = pq.read_table(directory / "passages.parquet", columns=list(PASSAGE_COLUMNS)).combine_chunks()
        except Exception as exc:  # present but unreadable, and no manifest checksum caught it
            raise RagRayError(f"cannot read index shard {directory}: {exc}") from exc
        n = table.num_rows
        if index.ntotal != n or vectors.shape != (n, self.dim) or index.d != self.dim:
            raise RagRayError(f"index shard {directory} is inconsistent: {index.ntotal} indexed vectors "
                             f"(dim {index.d}), stored vectors {vectors.shape}, {n} passages; expected dim {self.dim}")
        self.index, self.vectors, self._spill = index, vectors, None
        self.passages = table
        self._bm25.reset()
        self.directory = str(directory.resolve())
        self._tune(index)
        return n


class _Spill:
    """Rows waiting for finalize, on local disk: vectors appended raw (fp32, or fp16 for lossy
    indexes), passages as Parquet row groups. Removed by ``cleanup`` (or when garbage-collected)."""

    def __init__(self, dim: int, parent: str | None, dtype=np.float32) -> None:
        self.dim, self.rows, self.dtype = dim, 0, np.dtype(dtype)
        self.dir = tempfile.TemporaryDirectory(prefix="rag_ray_spill_", dir=parent)
        self.vector_path = Path(self.dir.name) / "vectors.bin"
        self.passage_path = Path(self.dir.name) / "passages.parquet"
        self._vectors = open(self.vector_path, "wb")
        self._writer = None

    def append(self, table, vectors: np.ndarray) -> int:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self.passage_path, table.schema)
        self._writer.write_table(table)
        self._vectors.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.rows += len(vectors)
        return self.rows

    def close(self):
        """(passages table, memory-mapped [rows, dim] vectors) in arrival order."""
        import pyarrow.parquet as pq

        self._vectors.close()
        self._writer.close()
        table = pq.read_table(self.passage_path)
        vectors = np.memmap(self.vector_path, dtype=self.dtype, mode="r", shape=(self.rows, self.dim))
        return table, vectors

    def close_quietly(self) -> None:
        """Close the files without reading them back (the build is abandoned)."""
        self._vectors.close()
        if self._writer is not None:
            self._writer.close()

    def cleanup(self) -> None:
        self.dir.cleanup()


def _empty_passages():
    import pyarrow as pa

    return pa.table({name: pa.array([], pa.string()) for name in PASSAGE_COLUMNS})


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Stored vectors, memory-mapped unless ``mmap`` is False (pages load on demand and are
    shared with the page cache)."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a ".tmp" name
        np.save(f, np.asarray(array), allow_pickle=False)


def merge_topk(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard top-k into a global top-k.

    Inputs are per-shard [B, k_s] score and row arrays (row -1 = empty slot). Returns
    (scores [B, k'], shard numbers [B, k'], local rows [B, k']) ranked by score, ties broken by
    shard then row order; empty slots have shard -1. k' = min(k, total slots).
    """
    order, top_shards, top_rows = topk_order(scores, rows, k)
    return np.take_along_axis(np.concatenate(scores, axis=1), order, 1), top_shards, top_rows


def topk_order(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``merge_topk``'s ranking as (positions in the shard-concatenated arrays [B, k'], shard
    numbers, local rows), so values that travel beside the scores can be taken along."""
    all_rows = np.concatenate(rows, axis=1)
    all_shards = np.concatenate([np.full(r.shape, s, dtype=np.int64) for s, r in enumerate(rows)], axis=1)
    masked = np.where(all_rows < 0, -np.inf, np.concatenate(scores, axis=1))
    order = np.argsort(-masked, axis=1, kind="stable")[:, :min(k, all_rows.shape[1])]
    top_rows = np.take_along_axis(all_rows, order, 1)
    top_shards = np.take_along_axis(all_shards, order, 1)
    top_shards[top_rows < 0] = -1
    return order, top_shards, top_rows
