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
import typing
from pathlib import Path
from typing import Callable

from rag_ray.config import EncoderConfig, IndexConfig, load_config
from rag_ray.errors import RagRayError, user_error
from rag_ray.types import DECODINGS, Mode


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join ('auto' under `ray job submit`); default: a private local Ray")
    p.add_argument("--num-cpus", type=int, help="logical CPUs for the local Ray")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_hybrid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hybrid", action="store_true",
                   help="fuse each shard's BM25 candidates with the dense ones (hits keep their q·d score)")
    p.add_argument("--lexical-k", type=int, help="BM25 candidates per question with --hybrid (default: as many as k)")


def _choices(cls: type, name: str) -> list[str]:
    """A config field's allowed values, from its Literal type (one list, kept with the config)."""
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    literal = next((a for a in args if typing.get_origin(a) is typing.Literal), tp)
    return list(typing.get_args(literal))


def _set_overrides(items: list[str] | None) -> dict:
    """``--set key.sub=value`` flags -> {"key.sub": value}, values parsed as YAML (numbers, lists, null)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RagRayError(f"--set {item!r}: expected KEY=VALUE, e.g. --set shards=4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _ray(args) -> None:
    from rag_ray.config import RayConfig
    from rag_ray.runtime import init_ray_from

    init_ray_from(RayConfig(address=args.address, num_cpus=args.num_cpus))


def _ray_overrides(args) -> dict:
    return {k: v for k, v in {"ray.address": args.address, "ray.num_cpus": args.num_cpus}.items() if v is not None}


# ----------------------------------------------------------------------------- index

def cmd_index(args) -> int:
    from rag_ray.indexing import run_index

    overrides: dict = {k: v for k, v in {
        "corpus": args.corpus, "out": args.out, "shards": args.shards, "index_type": args.index_type,
        "format": args.format, "max_words": args.max_words, "on_error": args.on_error,
        "embedders": args.embedders, "overwrite": args.overwrite or None, "encoder.name": args.encoder,
        "encoder.batch_size": args.batch_size, "encoder.precision": "bf16" if args.bf16 else args.precision,
    }.items() if v is not None}
    overrides.update(_ray_overrides(args))
    overrides.update(_set_overrides(args.set))
    report = run_index(load_config(IndexConfig, args.config, overrides))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"indexed {report['passages']} passages into {report['shards']} {report['index_type']} shards "
              f"{report['shard_passages']} at {report['index']}/{report['version']} in {report['seconds']} s "
              f"({report['passages_per_second']} passages/s)")
        if report["skipped_rows"]:
            print(f"skipped {report['skipped_rows']} malformed rows, e.g.: {report['skipped_examples'][0]}")
    return 0


# ----------------------------------------------------------------------------- search

def _query_encoder(index_dir: str, name: str | None):
    from rag_ray.encoders import Encoder
    from rag_ray.manifest import IndexManifest, resolve_index

    info = IndexManifest.read(resolve_index(index_dir)).encoder
    return Encoder.from_pretrained(name or info.name, pooling=info.pooling, normalize=info.normalize,
                                   max_length=info.max_length)


def _questions(args) -> list[str]:
    from rag_ray.datasets import MAX_QUESTION_CHARS

    if not args.question or any(not q.strip() for q in args.question):
        raise RagRayError("give at least one non-empty question")
    for q in args.question:
        if len(q) > MAX_QUESTION_CHARS:
            raise RagRayError(f"a question has {len(q)} characters, over the limit of {MAX_QUESTION_CHARS}")
    return [q.strip() for q in args.question]


def _excerpt(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_search(args) -> int:
    from rag_ray.retriever import Retriever

    questions = _questions(args)
    encoder = _query_encoder(args.index, args.encoder)
    _ray(args)
    retriever = Retriever.load(args.index, query_encoder=encoder)
    result = retriever.search(encoder.encode(questions), k=args.k, vectors=False)
    retriever.shutdown()
    if args.json:
        print(json.dumps([{"question": q, "hits": [h.__dict__ for h in hits]}
                          for q, hits in zip(questions, result.hits)]))
    else:
        for q, hits in zip(questions, result.hits):
            print(f"Q: {q}")
            for rank, h in enumerate(hits, start=1):
                print(f"  {rank:>2}. [{h.score:.4f}] {h.title} ({h.passage_id})\n      {_excerpt(h.text)}")
    return 0


def cmd_eval_retrieval(args) -> int:
    from rag_ray.datasets import read_questions
    from rag_ray.evaluation import KS, evaluate_retrieval, format_table
    from rag_ray.retriever import Retriever

    examples = read_questions(args.questions, limit=args.limit)
    encoder = _query_encoder(args.index, args.encoder)
    reranker, candidates = _reranker(args.reranker, args.rerank_candidates, encoder.device, args.rerank_prior)
    _ray(args)
    retriever = Retriever.load(args.index, query_encoder=encoder)
    ks = tuple(k for k in KS if k <= args.max_k)
    try:
        report = evaluate_retrieval(retriever, encoder, examples, args.index, ks=ks, bm25=not args.no_bm25,
                                    hybrid=args.hybrid, lexical_k=args.lexical_k, reranker=reranker,
                                    rerank_candidates=candidates)
    finally:
        retriever.shutdown()
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def _reranker(path: str | None, candidates: int | None, device, prior: float | None = None):
    """(reranker, its number of candidates) for --reranker: a saved model's (with the model's own
    rerank_candidates unless given) or a reranker directory's (20 unless given); (None, 20) without.
    ``prior``: its rank prior instead of the saved one."""
    from rag_ray.reranker import check_rank_prior

    if candidates is not None and not 1 <= candidates <= 2048:
        raise RagRayError(f"--rerank-candidates must be in 1..2048, got {candidates}")
    if prior is not None:
        check_rank_prior(prior, "--rerank-prior")
    if not path:
        if prior is not None:
            raise RagRayError("--rerank-prior applies to a --reranker")
        return None, candidates or 20
    from rag_ray.model import RagModel
    from rag_ray.reranker import Reranker

    root = Path(path)
    if (root / "rag_config.json").is_file():  # a saved RagModel
        if not (root / "reranker").is_dir():
            raise RagRayError(f"{path} has no reranker (train one with objective: reranker)")
        if candidates is None:
            candidates = RagModel.saved_config(root).rerank_candidates
        root = root / "reranker"
    elif not root.is_dir():
        raise RagRayError(f"--reranker {path}: no such directory")
    reranker = Reranker.from_pretrained(str(root), device=device)
    if prior is not None:
        reranker.rank_prior = prior
    return reranker, candidates or 20


def _pipeline(args, mode):
    """The model at --model and, unless closed-book, a retriever over --index (default: the index
    the model was trained against, from its metadata)."""
    from rag_ray.pipeline import RagPipeline
    from rag_ray.retriever import Retriever

    from rag_ray.model import RagModel

    model = RagModel.from_pretrained(args.model)
    mode = Mode.parse(mode or model.config.mode)
    if not mode.retrieves:
        return RagPipeline(model), mode
    index = args.index or (model.metadata.get("index") or {}).get("path")
    if not index:
        raise RagRayError(f"mode {mode.value!r} retrieves passages: give --index")
    _ray(args)
    return RagPipeline(model, Retriever.load(index, query_encoder=model.query_encoder)), mode


def cmd_eval_qa(args) -> int:
    from rag_ray.config import EvalConfig
    from rag_ray.evaluation import run_eval

    report = run_eval(load_config(EvalConfig, overrides={
        "model": args.model, "index": args.index, "questions": args.questions, "limit": args.limit,
        "mode": args.mode, "n_docs": args.n_docs, "decoding": args.decoding, "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens, "span_recovery": not args.no_span_recovery, "hybrid": args.hybrid,
        "lexical_k": args.lexical_k, "gold_passage": args.gold_passage, "rerank": not args.no_rerank,
        "doc_score_scale": args.doc_score_scale, "rerank_prior": args.rerank_prior, "predictions": args.predictions,
        **_ray_overrides(args)}))
    if args.json:
        print(json.dumps(report))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return 0


def cmd_compare(args) -> int:
    from rag_ray.evaluation import compare_predictions

    report = compare_predictions(args.a, args.b)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['questions']} questions, a = {args.a}, b = {args.b}")
    for metric in ("em", "f1"):
        m = report[metric]
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        print(f"{metric.upper()}: a {pct(m['a'])} [{pct(m['a_ci95'][0])}, {pct(m['a_ci95'][1])}]  "
              f"b {pct(m['b'])} [{pct(m['b_ci95'][0])}, {pct(m['b_ci95'][1])}]  a - b {pct(m['difference'])} "
              f"[{pct(m['difference_ci95'][0])}, {pct(m['difference_ci95'][1])}] (paired): "
              + ("separated" if m["separated"] else "not separated"))
    return 0


def cmd_ask(args) -> int:
    questions = _questions(args)
    pipeline, mode = _pipeline(args, args.mode)
    pipeline.span_recovery = not args.no_span_recovery
    pipeline.hybrid, pipeline.lexical_k = args.hybrid, args.lexical_k
    pipeline.use_reranker = pipeline.use_reranker and not args.no_rerank
    if args.rerank_prior is not None:
        pipeline.model.set_rerank_prior(args.rerank_prior, "--rerank-prior")
    answers = pipeline.answer(questions, mode=mode, n_docs=args.n_docs, decoding=args.decoding,
                              num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    pipeline.close()
    for a in answers:
        if args.json:
            print(json.dumps(a.to_dict()))
            continue
        print(f"Q: {a.question}\nA: {a.answer}   (log p = {a.score:.3f})")
        for rank, p in enumerate(a.passages, start=1):
            print(f"  {rank:>2}. posterior {p.posterior:.3f}  prior {p.prior:.3f}  q·d {p.score:.4f}  "
                  f"{p.title} ({p.passage_id})\n      {_excerpt(p.text)}")
    return 0


def cmd_train(args) -> int:
    from rag_ray.config import TrainConfig
    from rag_ray.runtime import init_ray_from
    from rag_ray.training import run_training

    cfg = load_config(TrainConfig, args.config, {**_ray_overrides(args), **_set_overrides(args.set)})
    init_ray_from(cfg.ray)
    report = run_training(cfg)
    if args.json:
        print(json.dumps(report))
    else:
        m = report["metrics"]
        dev = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if k.startswith("dev_") and isinstance(v, float))
        print(f"trained {m.get('step')} steps in {report['wall_seconds']} s "
              f"({m.get('samples_per_s', 0):.2f} samples/s); {dev}\nmodel: {report['model']}")
    return 0


# ----------------------------------------------------------------------------- serving

def cmd_serve(args) -> int:
    from rag_ray.config import ServeConfig
    from rag_ray.serving.app import run_serve

    overrides = {k: v for k, v in {
        "model": args.model, "index": args.index, "host": args.host, "port": args.port,
        "autoscaling.min_replicas": args.min_replicas, "autoscaling.max_replicas": args.max_replicas,
        "api_key_file": args.api_key_file, "allow_no_api_key": args.allow_no_api_key or None,
    }.items() if v is not None}
    overrides.update(_ray_overrides(args))
    overrides.update(_set_overrides(args.set))
    cfg = load_config(ServeConfig, args.config, overrides)
    url = run_serve(cfg)
    print(f"serving {cfg.model} over {cfg.index} at {url}/ (API: {url}/docs); Ctrl-C stops", flush=True)
    if args.no_keep:
        return 0
    import time

    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        serve.shutdown()
    return 0


def cmd_swap_index(args) -> int:
    import os
    import urllib.error
    import urllib.request

    key = args.api_key or os.environ.get("RAG_RAY_API_KEY")
    request = urllib.request.Request(
        args.url.rstrip("/") + "/v1/admin/index", data=json.dumps({"index_dir": args.index}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise RagRayError(f"{args.url} refused the swap (HTTP {exc.code}): {detail}; the old index keeps serving") \
            from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise RagRayError(f"cannot reach {args.url}: {getattr(exc, 'reason', exc)}") from None
    print(json.dumps(body) if args.json else f"now serving {body['index_version']}"
          + ("" if body.get("changed") else " (it already was)") + f" ({body.get('seconds', 0)} s)")
    return 0


# ----------------------------------------------------------------------------- quickstart

def cmd_quickstart(args) -> int:
    from rag_ray.quickstart import QuickstartConfig, run_quickstart

    fields = {"data": args.data, "budget_minutes": args.budget_minutes, "eval_questions": args.eval_questions,
              "port": args.port, "workdir": args.workdir, "keep": not args.no_keep}
    run_quickstart(QuickstartConfig(**{k: v for k, v in fields.items() if v is not None}))
    return 0


# ----------------------------------------------------------------------------- main

_RERANK_PRIOR_HELP = ("w in the reranker's order, logit - w * ln(1 + retriever rank) (default: the saved reranker's "
                      "own, 1 unless trained with another; 0: the logit alone)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="embed a corpus with Ray Data into a sharded FAISS index")
    p.add_argument("--config", help="YAML IndexConfig (flags override it)")
    p.add_argument("--corpus", nargs="+", help="corpus files or directories (jsonl, parquet, csv, tsv, SQuAD json), or 'squad-open'")
    p.add_argument("--out", help="index root: each build adds a version <out>/vNNNN and points <out>/current at it")
    p.add_argument("--shards", type=int)
    p.add_argument("--index-type", choices=_choices(IndexConfig, "index_type"))
    p.add_argument("--format", choices=_choices(IndexConfig, "format"))
    p.add_argument("--max-words", type=int)
    p.add_argument("--on-error", choices=_choices(IndexConfig, "on_error"), help="malformed rows: fail (default) or skip and count")
    p.add_argument("--encoder", help="passage encoder checkpoint (HF name or path)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=_choices(EncoderConfig, "precision"),
                   help="embedding precision; auto (default): bf16 where the hardware has it (AVX512-BF16/AMX, GPUs), else fp32")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--embedders", type=int, help="max embedding actors")
    p.add_argument("--overwrite", action="store_true",
                   help="after the new version becomes current, delete older versions no running shard reads")
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

    p = sub.add_parser("eval-retrieval", help="recall@k of dense retrieval vs. BM25 (and --hybrid) on a question file")
    p.add_argument("--index", required=True)
    p.add_argument("--questions", required=True, help="JSONL: {question, answers, doc_id} or {question, answer}; or squad-open:dev")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--encoder", help="query encoder checkpoint (default: the index's passage encoder)")
    p.add_argument("--no-bm25", action="store_true")
    p.add_argument("--reranker", help="a saved model with a reranker (or a reranker directory): adds a 'reranked' "
                                      "column, its order of the hybrid (else dense) top --rerank-candidates")
    p.add_argument("--rerank-candidates", type=int,
                   help="candidates the reranker orders (default: the model's own, else 20)")
    p.add_argument("--rerank-prior", type=float, help=_RERANK_PRIOR_HELP)
    _add_hybrid(p)
    _add_common(p)
    p.set_defaults(func=cmd_eval_retrieval)

    for name, help_text in (("eval-qa", "EM / F1 / answer NLL / recall of a trained RAG model on a question file"),
                            ("ask", "answer questions with a trained RAG model; prints each answer with its passages")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="a saved RagModel directory (a checkpoint's model/)")
        p.add_argument("--index", help="index root or version directory (default: the index the model was trained "
                                       "against; not needed for --mode closed_book)")
        if name == "eval-qa":
            p.add_argument("--questions", required=True, help="JSONL question file, or squad-open:dev")
            p.add_argument("--limit", type=int)
            p.add_argument("--gold-passage", action="store_true",
                           help="read each question from its gold passage alone, no search: the reader's ceiling")
            p.add_argument("--predictions", metavar="FILE",
                           help="also write each question's prediction, EM and F1 (JSONL) for rag-ray compare")
            p.add_argument("--doc-score-scale", type=float,
                           help="p(z|x) = softmax(scale * q.d) at this scale, not the model's own (1: unscaled)")
        else:
            p.add_argument("question", nargs="+")
        p.add_argument("--mode", choices=[m.value for m in Mode], help="default: the model's own")
        p.add_argument("--n-docs", type=int)
        p.add_argument("--decoding", choices=DECODINGS, help="default: the mode's first (thorough / greedy)")
        p.add_argument("--num-beams", type=int, default=1)
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.add_argument("--no-span-recovery", action="store_true",
                       help="answer with the tokenizer's decode, not the passage's own text of the answer")
        p.add_argument("--no-rerank", action="store_true",
                       help="read the retriever's top n_docs even when the model has a reranker")
        p.add_argument("--rerank-prior", type=float, help=_RERANK_PRIOR_HELP)
        _add_hybrid(p)
        _add_common(p)
        p.set_defaults(func=cmd_eval_qa if name == "eval-qa" else cmd_ask)

    p = sub.add_parser("compare", help="EM / F1 of two eval-qa --predictions files of the same questions, with "
                                       "the paired 95%% interval of each difference")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="serve a trained model over an index with Ray Serve (HTTP API + web page)")
    p.add_argument("--config", help="YAML ServeConfig (flags override it)")
    p.add_argument("--model", help="a saved RagModel directory")
    p.add_argument("--index", help="index root (its current version) or a version directory")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; another needs an API key)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--min-replicas", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--api-key-file", help="file holding the API key (or set $RAG_RAY_API_KEY)")
    p.add_argument("--allow-no-api-key", action="store_true", help="serve beyond loopback without an API key")
    p.add_argument("--no-keep", action="store_true", help="return once the service is up (it runs on in Ray)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any ServeConfig field, e.g. max_batch_size=4")
    _add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("swap-index", help="make a running service serve another index; returns once it answers")
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("--index", required=True, help="index root or version directory, as the service sees it")
    p.add_argument("--api-key", help="default: $RAG_RAY_API_KEY")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_swap_index)

    p = sub.add_parser("quickstart", help="the whole system on squad-open: index, train, evaluate, serve, ask")
    p.add_argument("--data", help="squad-open directory (default: $RAG_RAY_DATA, ../shared/data/squad-open, "
                                  "or SQuAD v1.1's dev file downloaded once)")
    p.add_argument("--budget-minutes", type=float, help="training time (default 13): reader warm-up, then RAG")
    p.add_argument("--eval-questions", type=int, help="dev questions for EM/F1 (default 200)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000, or a free one)")
    p.add_argument("--workdir", help="where runs and the final model go (default runs/quickstart)")
    p.add_argument("--no-keep", action="store_true", help="stop the service at the end instead of serving until Ctrl-C")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="joint RAG fine-tuning with Ray Train against a frozen index")
    p.add_argument("--config", required=True, help="YAML TrainConfig, e.g. jobs/configs/train_squad_open_cpu.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set max_steps=100")
    _add_common(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None, run: Callable | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
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
