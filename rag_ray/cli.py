"""``rag-ray``: index, search, evaluate and train from the shell; ``--json`` for scripts.

Every subcommand builds a typed config, calls one library function, and prints. A user error
anywhere (a malformed corpus row inside a Ray task included) ends as one line naming the problem
and exit status 2, not a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable

from rag_ray.config import IndexConfig, load_config


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join ('auto' under `ray job submit`); default: a private local Ray")
    p.add_argument("--num-cpus", type=int, help="logical CPUs for the local Ray")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def _set_overrides(items: list[str] | None) -> dict:
    """``--set key.sub=value`` flags -> {"key.sub": value}, values parsed as YAML (numbers, lists, null)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set shards=4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _ray(args) -> None:
    from rag_ray.runtime import init_ray

    init_ray(address=args.address, num_cpus=args.num_cpus)


# ----------------------------------------------------------------------------- index

def cmd_index(args) -> int:
    from rag_ray.datasets import resolve_data_path
    from rag_ray.indexing import build_index

    if args.corpus:
        args.corpus = [resolve_data_path(c) for c in args.corpus]
    overrides: dict = {k: v for k, v in {
        "corpus": args.corpus, "out": args.out, "shards": args.shards, "index_type": args.index_type,
        "format": args.format, "max_words": args.max_words, "on_error": args.on_error,
        "embedders": args.embedders, "overwrite": args.overwrite or None, "encoder.name": args.encoder,
        "encoder.batch_size": args.batch_size, "encoder.precision": "bf16" if args.bf16 else None,
    }.items() if v is not None}
    overrides.update(_set_overrides(args.set))
    cfg = load_config(IndexConfig, args.config, overrides)
    _ray(args)
    start = time.perf_counter()
    manifest = build_index(cfg)
    seconds = time.perf_counter() - start
    report = {"index": cfg.out, "passages": manifest.passage_count, "shards": manifest.shard_count,
              "shard_passages": [s.passages for s in manifest.shards], "index_type": manifest.index_type,
              "encoder": manifest.encoder.name, "dim": manifest.encoder.dim, "seconds": round(seconds, 1),
              "passages_per_second": round(manifest.passage_count / seconds, 2),
              "skipped_rows": manifest.corpus.get("skipped_rows", 0)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"indexed {report['passages']} passages into {report['shards']} {report['index_type']} shards "
              f"{report['shard_passages']} at {cfg.out} in {seconds:.1f} s ({report['passages_per_second']} passages/s)")
        if report["skipped_rows"]:
            print(f"skipped {report['skipped_rows']} malformed rows, e.g.: {manifest.corpus['skipped_examples'][0]}")
    return 0


# ----------------------------------------------------------------------------- search

def _query_encoder(index_dir: str, name: str | None):
    from rag_ray.encoders import Encoder
    from rag_ray.manifest import IndexManifest

    info = IndexManifest.read(index_dir).encoder
    return Encoder.from_pretrained(name or info.name, pooling=info.pooling, normalize=info.normalize,
                                   max_length=info.max_length)


def cmd_search(args) -> int:
    from rag_ray.retriever import Retriever

    if not args.question or any(not q.strip() for q in args.question):
        raise ValueError("give at least one non-empty question")
    encoder = _query_encoder(args.index, args.encoder)
    _ray(args)
    retriever = Retriever.load(args.index, query_encoder=encoder)
    result = retriever.search(encoder.encode(args.question), k=args.k)
    if args.json:
        print(json.dumps([{"question": q, "hits": [h.__dict__ for h in hits]}
                          for q, hits in zip(args.question, result.hits)]))
    else:
        for q, hits in zip(args.question, result.hits):
            print(f"Q: {q}")
            for rank, h in enumerate(hits, start=1):
                text = h.text if len(h.text) <= 240 else h.text[:237] + "..."
                print(f"  {rank:>2}. [{h.score:.4f}] {h.title} ({h.passage_id})\n      {text}")
    return 0


def cmd_eval_retrieval(args) -> int:
    from rag_ray.datasets import read_questions
    from rag_ray.evaluation import KS, evaluate_retrieval, format_table
    from rag_ray.retriever import Retriever

    examples = read_questions(args.questions, limit=args.limit)
    encoder = _query_encoder(args.index, args.encoder)
    _ray(args)
    retriever = Retriever.load(args.index, query_encoder=encoder)
    ks = tuple(k for k in KS if k <= args.max_k)
    report = evaluate_retrieval(retriever, encoder, examples, args.index, ks=ks, bm25=not args.no_bm25)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def cmd_eval_qa(args) -> int:
    from rag_ray.datasets import read_questions
    from rag_ray.evaluation import evaluate_qa
    from rag_ray.model import RagModel
    from rag_ray.retriever import Retriever

    examples = read_questions(args.questions, limit=args.limit)
    model = RagModel.from_pretrained(args.model)
    mode = args.mode or model.config.mode
    n_docs = args.n_docs or model.config.n_docs
    retriever = None
    if mode != "closed_book":
        if not args.index:
            raise ValueError(f"mode {mode!r} retrieves passages: give --index")
        _ray(args)
        retriever = Retriever.load(args.index, query_encoder=model.query_encoder)
    rows = [{"question": e.question, "answers": list(e.answers), "doc_id": e.doc_id or ""} for e in examples]
    report = evaluate_qa(model, retriever, rows, mode=mode, n_docs=n_docs, decoding=args.decoding,
                         num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    report.update({"model": args.model, "mode": mode, "n_docs": n_docs})
    if args.json:
        print(json.dumps(report))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return 0


def cmd_train(args) -> int:
    from rag_ray.config import TrainConfig
    from rag_ray.training import run_training

    cfg = load_config(TrainConfig, args.config, _set_overrides(args.set))
    from rag_ray.runtime import init_ray

    init_ray(address=args.address or cfg.ray.address, num_cpus=args.num_cpus or cfg.ray.num_cpus,
             object_store_memory=cfg.ray.object_store_memory)
    report = run_training(cfg)
    if args.json:
        print(json.dumps(report))
    else:
        m = report["metrics"]
        dev = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if k.startswith("dev_") and isinstance(v, float))
        print(f"trained {m.get('step')} steps in {report['wall_seconds']} s "
              f"({m.get('samples_per_s', 0):.2f} samples/s); {dev}\nmodel: {report['model']}")
    return 0


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="embed a corpus with Ray Data into a sharded FAISS index")
    p.add_argument("--config", help="YAML IndexConfig (flags override it)")
    p.add_argument("--corpus", nargs="+", help="corpus files or directories (jsonl, parquet, csv, tsv, SQuAD json), or 'squad-open'")
    p.add_argument("--out", help="index directory to write")
    p.add_argument("--shards", type=int)
    p.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq"])
    p.add_argument("--format", choices=["jsonl", "parquet", "csv", "tsv", "squad"])
    p.add_argument("--max-words", type=int)
    p.add_argument("--on-error", choices=["raise", "skip"], help="malformed rows: fail (default) or skip and count")
    p.add_argument("--encoder", help="passage encoder checkpoint (HF name or path)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while embedding (fast on AVX512-BF16 CPUs and GPUs)")
    p.add_argument("--embedders", type=int, help="max embedding actors")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. encoder.max_length=128")
    _add_common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="top-k passages for questions")
    p.add_argument("--index", required=True)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--encoder", help="query encoder checkpoint (default: the index's passage encoder)")
    p.add_argument("question", nargs="+")
    _add_common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval-retrieval", help="recall@k of dense retrieval vs. BM25 on a question file")
    p.add_argument("--index", required=True)
    p.add_argument("--questions", required=True, help="JSONL: {question, answers, doc_id} or {question, answer}; or squad-open:dev")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--encoder", help="query encoder checkpoint (default: the index's passage encoder)")
    p.add_argument("--no-bm25", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_eval_retrieval)

    p = sub.add_parser("eval-qa", help="EM / F1 / answer NLL / recall of a trained RAG model on a question file")
    p.add_argument("--model", required=True, help="a saved RagModel directory (a checkpoint's model/)")
    p.add_argument("--index", help="index directory (not needed for --mode closed_book)")
    p.add_argument("--questions", required=True, help="JSONL question file, or squad-open:dev")
    p.add_argument("--limit", type=int)
    p.add_argument("--mode", choices=["sequence", "token", "closed_book"], help="default: the model's own")
    p.add_argument("--n-docs", type=int)
    p.add_argument("--decoding", choices=["greedy", "beam", "thorough", "fast"])
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    _add_common(p)
    p.set_defaults(func=cmd_eval_qa)

    p = sub.add_parser("train", help="joint RAG fine-tuning with Ray Train against a frozen index")
    p.add_argument("--config", required=True, help="YAML TrainConfig, e.g. jobs/configs/train_squad_open_cpu.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set max_steps=100")
    _add_common(p)
    p.set_defaults(func=cmd_train)
    return parser


def user_error(exc: BaseException) -> BaseException | None:
    """The first user-facing error (ValueError family) in an exception's chain, Ray wrappers included."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        wrapper = type(e).__module__.startswith("ray.")  # RayTaskError(CorpusError) and friends
        if isinstance(e, (ValueError, FileNotFoundError)) and not wrapper:
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def main(argv: list[str] | None = None, run: Callable | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rag_ray").setLevel(logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - turned into one clear line or re-raised
        err = user_error(exc)
        if err is None:
            raise
        print(f"rag-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
