"""Embedding throughput: the Ray Data index build vs. the same encoder in one plain process.

Both sides embed the same passages with the same EmbedPassages stage, batch size and torch
threads; the baseline also builds the same FAISS Flat index, so the ratio is end to end:

    python bench/bench_embed.py --corpus squad-open --threads 2 [--docs 1000] [--repeat 4] [--precision auto] [--bf16]

Both sides use the same precision (``auto``: bf16 where the CPU has it, as the build does). The
plain side is timed stage by stage (read + split, load, embed, shard build, write); the Ray side
reports its stream (read -> embed -> route -> spill), finalize and save phases, and Ray Data's
per-operator stats. ``--bf16`` also measures fp32 vs bf16 speed and the recall cost on dev.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from _common import RaySampler, emit, rss_mb  # noqa: E402


def passages_for(corpus: str, docs: int | None, repeat: int = 1):
    """The corpus file to embed (the first ``docs`` documents; ``repeat`` copies of it with their
    own ids, to see how the fixed costs amortize over a longer build) and its passages."""
    import json

    from rag_ray.corpus import read_passages
    from rag_ray.datasets import resolve_data_path

    path = resolve_data_path(corpus)
    if docs or repeat > 1:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        for copy in range(repeat):
            with open(path) as f:
                for i, line in enumerate(f):
                    if docs and i >= docs:
                        break
                    if copy:
                        row = json.loads(line)
                        row["id"] = f"{row['id']}@{copy}"
                        line = json.dumps(row) + "\n"
                    tmp.write(line)
        tmp.close()
        path = tmp.name
    return path, read_passages(path)


def plain(path: str, encoder_cfg, threads: int, batch_rows: int, shards: int = 0):
    """The baseline: what a plain script does, stage by stage. Read and split, load the encoder,
    embed; with ``shards``, also the same IndexShard build and write as the Ray side (rows routed
    by the same ``shard_of``), else one faiss.IndexFlatIP."""
    import faiss

    import rag_ray.encoders  # noqa: F401  (imports torch and transformers, untimed as before:
    # EmbedPassages imports them itself since the Ray stages stopped importing them at module level)
    from rag_ray.corpus import read_passages
    from rag_ray.indexing import EmbedPassages, shard_of
    from rag_ray.shard import IndexShard

    t = {}
    start = time.perf_counter()
    passages = read_passages(path)
    t["read_split_s"] = time.perf_counter() - start
    t0 = time.perf_counter()
    stage = EmbedPassages(encoder_cfg, torch_threads=threads)
    t["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectors = []
    for i in range(0, len(passages), batch_rows):
        rows = passages[i : i + batch_rows]
        batch = {"title": np.array([p.title for p in rows], dtype=object), "text": np.array([p.text for p in rows], dtype=object)}
        vectors.append(stage(batch)["vector"])
    vecs = np.concatenate(vectors).astype(np.float32)
    t["embed_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if shards:
        parts = [IndexShard(vecs.shape[1]) for _ in range(shards)]
        owner = np.array([shard_of(p.passage_id, shards) for p in passages])
        for s, part in enumerate(parts):
            idx = np.nonzero(owner == s)[0]
            part.add([passages[i].passage_id for i in idx], [passages[i].doc_id for i in idx],
                     [passages[i].title for i in idx], [passages[i].text for i in idx], vecs[idx])
            part.finalize()
        t["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = tempfile.mkdtemp(prefix="bench_plain_")
        for s, part in enumerate(parts):
            part.save(os.path.join(out, f"shard-{s:05d}"))
        t["write_s"] = time.perf_counter() - t0
    else:
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        t["index_s"] = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **t, "passages_per_s": len(passages) / seconds,
            "embed_passages_per_s": len(passages) / t["embed_s"], "peak_rss_mb": rss_mb(),
            "precision": stage.precision}, vecs, stage.encoder


def ray_pipeline(path: str, n_passages: int, threads: int | None, shards: int, precision: str, embedders: int | None):
    import logging

    from rag_ray.config import IndexConfig, load_config
    from rag_ray.indexing import build_index, embedding_resources
    from rag_ray.retriever import Retriever
    from rag_ray.runtime import init_ray

    import ray

    init_ray(num_cpus=max(2, os.cpu_count() or 2))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rag_ray.indexing").setLevel(logging.DEBUG)  # Ray Data's per-stage stats
    out = tempfile.mkdtemp(prefix="bench_idx_")
    overrides = {"corpus": [path], "out": out, "shards": shards, "overwrite": True, "encoder.precision": precision}
    if threads:
        overrides["torch_threads"] = threads
    if embedders:
        overrides["embedders"] = embedders
    cfg = load_config(IndexConfig, overrides=overrides)
    pool = embedding_resources(cfg, ray.cluster_resources())
    with RaySampler() as build_mem:
        start = time.perf_counter()
        manifest = build_index(cfg)
        seconds = time.perf_counter() - start
    assert manifest.passage_count == n_passages
    with RaySampler() as load_mem:
        t0 = time.perf_counter()
        retriever = Retriever.load(out)
        load_s = time.perf_counter() - t0
    shard_rss = [s["max_rss_mb"] for s in retriever.stats()]
    retriever.shutdown()
    return {"seconds": seconds, "passages_per_s": n_passages / seconds, "pool": pool,
            "stream_s": manifest.corpus["embed_seconds"], "finalize_s": manifest.corpus.get("finalize_seconds"),
            "save_s": manifest.corpus.get("save_seconds"),
            "build_peak_total_rss_mb": build_mem.peak_total, "build_peak_single_worker_rss_mb": build_mem.peak_single,
            "load_seconds": load_s, "load_peak_total_rss_mb": load_mem.peak_total, "shard_max_rss_mb": shard_rss,
            "index_dir": out}


def recall_cost(vecs32, vecs16, encoder, passages, dev: str, ks=(1, 5, 20)):
    """recall@k by gold doc on dev questions: fp32 passage vectors vs. bf16-autocast ones."""
    import faiss

    from rag_ray.datasets import read_questions

    qs = read_questions(dev)
    q = encoder.encode([e.question for e in qs])
    out = {}
    for name, v in (("fp32", vecs32), ("bf16", vecs16)):
        index = faiss.IndexFlatIP(v.shape[1])
        index.add(v)
        _, rows = index.search(q, max(ks))
        for k in ks:
            out[f"{name}_recall@{k}"] = float(np.mean([e.doc_id in {passages[r].doc_id for r in row[:k]} for e, row in zip(qs, rows)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="squad-open")
    parser.add_argument("--docs", type=int, help="first N documents only")
    parser.add_argument("--repeat", type=int, default=1, help="embed this many copies of the corpus (own ids)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain process")
    parser.add_argument("--ray-threads", type=int, help="torch threads per embedding actor (default: sized by the build)")
    parser.add_argument("--embedders", type=int, help="embedding actors (default: sized by the build)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--bf16", action="store_true", help="also measure fp32 vs bf16 speed and recall")
    parser.add_argument("--dev", default="squad-open:dev")
    args = parser.parse_args()

    from rag_ray.config import EncoderConfig

    path, passages = passages_for(args.corpus, args.docs, args.repeat)
    print(f"{len(passages)} passages from {path}; threads={args.threads}; precision={args.precision}", flush=True)
    base, vecs, encoder = plain(path, EncoderConfig(precision=args.precision), args.threads, batch_rows=256,
                                shards=args.shards)
    print(f"plain process: {base['passages_per_s']:.1f} passages/s end to end "
          f"({base['embed_passages_per_s']:.1f}/s embedding only, {base['precision']}); stages "
          + ", ".join(f"{k} {v:.1f}" for k, v in base.items() if k.endswith("_s")), flush=True)
    ray_res = ray_pipeline(path, len(passages), args.ray_threads, args.shards, args.precision, args.embedders)
    ratio = ray_res["passages_per_s"] / base["passages_per_s"]
    print(f"ray data pipeline: {ray_res['passages_per_s']:.1f} passages/s end to end -> ratio {ratio:.2f}; "
          f"pool {ray_res['pool']}; stream {ray_res['stream_s']} s, finalize {ray_res['finalize_s']} s, "
          f"save {ray_res['save_s']} s; build peak RSS {ray_res['build_peak_total_rss_mb']:.0f} MiB total, "
          f"load {ray_res['load_seconds']:.1f} s", flush=True)
    result = {"bench": "embed", "passages": len(passages), "threads": args.threads, "plain": base, "ray": ray_res,
              "ratio_ray_over_plain": ratio}
    if args.bf16:
        fp, vecs32, _ = plain(path, EncoderConfig(precision="fp32"), args.threads, batch_rows=256)
        bf, vecs16, _ = plain(path, EncoderConfig(precision="bf16"), args.threads, batch_rows=256)
        result["bf16"] = {**bf, "speedup_embed": bf["embed_passages_per_s"] / fp["embed_passages_per_s"],
                          **recall_cost(vecs32, vecs16, encoder, passages, args.dev)}
        print(f"bf16 autocast: {result['bf16']['speedup_embed']:.2f}x embedding speed; recall "
              + ", ".join(f"{k}={v:.3f}" for k, v in result["bf16"].items() if "recall" in k), flush=True)
    emit(result)


if __name__ == "__main__":
    main()
