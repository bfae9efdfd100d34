"""One FAISS shard: vectors, index and passage payload for a slice of the corpus.

``IndexShard`` is plain Python (testable without Ray); the Ray actor around it is made at the
edge by :func:`shard_actor`. A shard buffers rows while the corpus streams in, then builds its
index in :meth:`finalize` from rows sorted by ``passage_id``, so the same corpus always gives
byte-identical shard files, whatever order Ray Data delivered the rows in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from rag_ray.errors import RagRayError
from rag_ray.io import atomic_path, sha256_file

IndexType = Literal["flat", "hnsw", "ivfpq"]
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
SHARD_FILES = ("index.faiss", "vectors.npy", "passages.parquet")
#: Below this many vectors a shard cannot train an IVF-PQ quantizer worth having.
MIN_IVFPQ_VECTORS = 1000


class IndexShard:
    """Passages + their vectors + a FAISS inner-product index over them.

    Search returns shard-local row numbers and scores; :meth:`fetch` turns winning rows into
    payload (ids, titles, texts, stored vectors) so only the merged top-k cross the network.

    With ``restore_from`` the constructor loads (and checksums against ``files``) a saved shard,
    so an actor that Ray restarts after a crash comes back complete, never empty.
    """

    def __init__(self, dim: int, index_type: IndexType = "flat", hnsw_m: int = 32, ef_search: int = 128,
                 ivf_nlist: int | None = None, pq_m: int | None = None, nprobe: int = 16, seed: int = 0,
                 restore_from: str | os.PathLike | None = None, files: dict[str, dict] | None = None) -> None:
        if index_type not in INDEX_TYPES:
            raise RagRayError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if dim < 1:
            raise RagRayError(f"dim must be >= 1, got {dim}")
        if index_type == "ivfpq" and pq_m is not None and dim % pq_m:
            raise RagRayError(f"pq_m={pq_m} must divide the vector dimension {dim}")
        self.dim, self.index_type = dim, index_type
        self.hnsw_m, self.ef_search, self.ivf_nlist, self.pq_m, self.nprobe, self.seed = (
            hnsw_m, ef_search, ivf_nlist, pq_m, nprobe, seed)
        self._pending: list[tuple[list[str], list[str], list[str], list[str], np.ndarray]] = []
        self.index: faiss.Index | None = None
        self.passage_ids: list[str] = []
        self.doc_ids: list[str] = []
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.vectors = np.zeros((0, dim), dtype=np.float16)
        self.directory: str | None = None
        if restore_from is not None:
            self.restore(restore_from, files)

    # ------------------------------------------------------------------ build
    def add(self, passage_ids, doc_ids, titles, texts, vectors: np.ndarray) -> int:
        """Buffer a batch of rows; returns how many the shard now holds in its buffer."""
        vectors = np.asarray(vectors, dtype=np.float32)
        n = len(passage_ids)
        if vectors.ndim != 2 or vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {vectors.shape}")
        if not (len(doc_ids) == len(titles) == len(texts) == n):
            raise ValueError("passage_ids, doc_ids, titles and texts must have the same length")
        if self.index is not None:
            raise RuntimeError("shard is already finalized; build a new shard to add rows")
        self._pending.append((list(passage_ids), list(doc_ids), list(titles), list(texts), vectors))
        return sum(len(p[0]) for p in self._pending)

    def finalize(self) -> int:
        """Sort buffered rows by passage id, build the FAISS index; returns the row count.

        Vectors are moved chunk by chunk into one sorted array (each buffered chunk is freed as it
        is copied), so the peak is about one extra copy of the shard, not three.
        """
        pids = [x for p in self._pending for x in p[0]]
        if len(set(pids)) != len(pids):
            seen: set[str] = set()
            dup = next(x for x in pids if x in seen or seen.add(x))
            raise RagRayError(f"duplicate passage_id {dup!r}: document ids must be unique across the corpus")
        order = np.array(sorted(range(len(pids)), key=pids.__getitem__), dtype=np.int64)
        position = np.empty(len(pids), dtype=np.int64)
        position[order] = np.arange(len(pids))
        docs, titles, texts = ([x for p in self._pending for x in p[j]] for j in (1, 2, 3))
        self.passage_ids = [pids[i] for i in order]
        self.doc_ids = [docs[i] for i in order]
        self.titles = [titles[i] for i in order]
        self.texts = [texts[i] for i in order]
        del pids, docs, titles, texts
        vecs = np.empty((len(order), self.dim), dtype=np.float32)
        offset = 0
        while self._pending:
            chunk = self._pending.pop(0)[4]
            vecs[position[offset : offset + len(chunk)]] = chunk
            offset += len(chunk)
        self.vectors = vecs.astype(np.float16)
        self.index = self._build(vecs)
        return len(self.passage_ids)

    def _build(self, vecs: np.ndarray) -> faiss.Index:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
        else:
            n = len(vecs)
            if n < MIN_IVFPQ_VECTORS:
                raise RagRayError(f"ivfpq needs at least {MIN_IVFPQ_VECTORS} vectors per shard to train, "
                                 f"this shard has {n}; use --index-type flat or hnsw, or fewer shards")
            nlist = self.ivf_nlist or max(1, min(4 * int(math.sqrt(n)), n // 39))
            m = self.pq_m or next(m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim) if m and self.dim % m == 0)
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.seed)
            sample = vecs[rng.choice(n, size=min(n, max(256 * 40, nlist * 40)), replace=False)]
            index.train(sample)
        if len(vecs):
            index.add(vecs)
        self._tune(index)
        return index

    def _tune(self, index: faiss.Index) -> None:
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe

    # ------------------------------------------------------------------ query
    def __len__(self) -> int:
        return len(self.passage_ids)

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
        scores, rows = self.index.search(queries, kk)
        return scores, rows

    def fetch(self, rows: list[int]) -> dict:
        """Payload for local rows: ids, doc ids, titles, texts and stored vectors (fp16)."""
        return {
            "passage_id": [self.passage_ids[r] for r in rows],
            "doc_id": [self.doc_ids[r] for r in rows],
            "title": [self.titles[r] for r in rows],
            "text": [self.texts[r] for r in rows],
            "vectors": np.asarray(self.vectors[rows]),
        }

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
                "directory": self.directory, "pid": os.getpid(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> dict[str, dict]:
        """Write the shard's files into ``directory`` (each written aside, then renamed);
        returns {file: {sha256, bytes}} for the manifest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.index is None:
            raise RuntimeError("finalize() the shard before save()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        writers = {
            "index.faiss": lambda p: faiss.write_index(self.index, str(p)),
            "vectors.npy": lambda p: _save_npy(p, self.vectors),
            "passages.parquet": lambda p: pq.write_table(pa.table({
                "passage_id": self.passage_ids, "doc_id": self.doc_ids,
                "title": self.titles, "text": self.texts}), p),
        }
        files = {}
        for name, write in writers.items():
            with atomic_path(directory / name) as tmp:
                write(tmp)
            files[name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
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
            vectors = np.load(directory / "vectors.npy", mmap_mode="r" if mmap_vectors else None, allow_pickle=False)
            table = pq.read_table(directory / "passages.parquet")
        except Exception as exc:  # present but unreadable, and no manifest checksum caught it
            raise RagRayError(f"cannot read index shard {directory}: {exc}") from exc
        n = table.num_rows
        if index.ntotal != n or vectors.shape != (n, self.dim) or index.d != self.dim:
            raise RagRayError(f"index shard {directory} is inconsistent: {index.ntotal} indexed vectors "
                             f"(dim {index.d}), stored vectors {vectors.shape}, {n} passages; expected dim {self.dim}")
        self.index, self.vectors, self._pending = index, vectors, []
        self.passage_ids = table.column("passage_id").to_pylist()
        self.doc_ids = table.column("doc_id").to_pylist()
        self.titles = table.column("title").to_pylist()
        self.texts = table.column("text").to_pylist()
        self.directory = str(directory.resolve())
        self._tune(index)
        return n


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a ".tmp" name
        np.save(f, np.asarray(array), allow_pickle=False)


def merge_topk(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard top-k into a global top-k.

    Inputs are per-shard [B, k_s] score and row arrays (row -1 = empty slot). Returns
    (scores [B, k'], shard numbers [B, k'], local rows [B, k']) ranked by score, ties broken by
    shard then row order; empty slots have shard -1. k' = min(k, total slots).
    """
    b = scores[0].shape[0]
    all_scores = np.concatenate(scores, axis=1) if scores else np.zeros((b, 0), np.float32)
    all_rows = np.concatenate(rows, axis=1)
    all_shards = np.concatenate([np.full(r.shape, s, dtype=np.int64) for s, r in enumerate(rows)], axis=1)
    masked = np.where(all_rows < 0, -np.inf, all_scores)
    kk = min(k, all_scores.shape[1])
    order = np.argsort(-masked, axis=1, kind="stable")[:, :kk]
    top_scores = np.take_along_axis(all_scores, order, 1)
    top_rows = np.take_along_axis(all_rows, order, 1)
    top_shards = np.take_along_axis(all_shards, order, 1)
    top_shards[top_rows < 0] = -1
    return top_scores, top_shards, top_rows
