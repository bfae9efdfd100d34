"""Decode latency per question for each RAG decoding mode, K=5 and K=10, offline default model.

Model: ``RagModel.from_components()`` (MiniLM query encoder, BERT2BERT-from-MiniLM generator with
the copy head), untrained: latency does not depend on the weights, but an untrained model
rarely emits EOS, so every hypothesis runs to ``--max-new-tokens`` (the worst case).
Passages: the question's gold squad-open paragraph plus K-1 others from the corpus, with
their MiniLM vectors, so the run needs no index.

    python bench/bench_decode.py --questions 10 --threads 1

RAG-Token runs with and without its KV cache (the baseline), and prints the speed-up.
Prints a table and one JSON line (``{"bench": "decode", ...}``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rag_ray.model import RagModel

from _common import Passage, read_jsonl  # noqa: E402  (bench/ is on sys.path when run as a script)

#: (mode, decoding, KV cache): RAG-Token also runs without its cache, the baseline of its ratio
MODES = [("token", "greedy", False), ("token", "greedy", True), ("token", "beam", False), ("token", "beam", True),
         ("sequence", "thorough", True), ("sequence", "fast", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/squad-open", help="squad-open directory (read only)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--ks", default="5,10")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    corpus = read_jsonl(data / "corpus.jsonl")
    by_id = {d["id"]: i for i, d in enumerate(corpus)}
    dev = read_jsonl(data / "dev.jsonl")[: args.questions]
    ks = [int(k) for k in args.ks.split(",")]
    model = RagModel.from_components(device="cpu").eval()
    rng = random.Random(args.seed)
    kmax = max(ks)
    rows = []
    for q in dev:
        others = [i for i in rng.sample(range(len(corpus)), kmax) if i != by_id[q["doc_id"]]][: kmax - 1]
        rows.append([by_id[q["doc_id"]], *others])
    needed = sorted({i for r in rows for i in r})
    vecs = model.query_encoder.encode([f"{corpus[i]['title']} {corpus[i]['text']}" for i in needed])
    vec_of = {i: v for i, v in zip(needed, vecs)}
    result = {"bench": "decode", "questions": len(dev), "num_beams": args.num_beams,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "latency_s": {}}
    print(f"{'K':>3} {'mode':>18} {'mean s/q':>9} {'median':>8}")
    for k in ks:
        for mode, decoding, cache in MODES:
            times = []
            for q, row in zip(dev, rows):
                passages = [[Passage(corpus[i]["title"], corpus[i]["text"]) for i in row[:k]]]
                dv = np.stack([vec_of[i] for i in row[:k]])[None]
                t0 = time.perf_counter()
                model.generate([q["question"]], passages, dv, mode=mode, decoding=decoding,
                               num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, n_docs=k,
                               use_cache=cache)
                times.append(time.perf_counter() - t0)
            name = f"{mode}-{decoding}" + ("" if cache else "-nocache")
            result["latency_s"][f"K{k}/{name}"] = {"mean": round(statistics.mean(times), 3),
                                                     "median": round(statistics.median(times), 3)}
            print(f"{k:>3} {name:>18} {statistics.mean(times):>9.3f} {statistics.median(times):>8.3f}", flush=True)
        ratio = result["latency_s"][f"K{k}/sequence-fast"]["mean"] / result["latency_s"][f"K{k}/sequence-thorough"]["mean"]
        result[f"K{k}_fast_over_thorough"] = round(ratio, 3)
        print(f"K={k}: fast / thorough = {ratio:.3f}")
        for decoding in ("greedy", "beam"):
            lat = result["latency_s"]
            speedup = lat[f"K{k}/token-{decoding}-nocache"]["mean"] / lat[f"K{k}/token-{decoding}"]["mean"]
            result[f"K{k}_token_{decoding}_cache_speedup"] = round(speedup, 2)
            print(f"K={k}: RAG-Token {decoding}: no cache / KV cache = {speedup:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
