"""Retrieval evaluation: recall@k by gold document and by answer string, dense vs. BM25 (and
hybrid: both fused, with where each gold hit came from).

All retrievers rank the very same passages (BM25 reads them back from the index's shard files),
so the comparison isolates the ranking function.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import numpy as np

from rag_ray.datasets import QAExample
from rag_ray.errors import RagRayError
from rag_ray.lexical import SOURCES, Bm25Index
from rag_ray.manifest import IndexManifest, resolve_index
from rag_ray.metrics import normalize_answer
from rag_ray.types import Hit, Mode, SearchResult

if TYPE_CHECKING:
    from rag_ray.config import EvalConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
KS = (1, 5, 20, 100)


def index_passages(index_dir: str | Path) -> dict[str, list[str]]:
    """Every passage stored in an index (columns passage_id, doc_id, title, text), shard by shard."""
    import pyarrow.parquet as pq

    index_dir = resolve_index(index_dir)
    manifest = IndexManifest.read(index_dir)
    cols: dict[str, list[str]] = {"passage_id": [], "doc_id": [], "title": [], "text": []}
    for info in manifest.shards:
        table = pq.read_table(index_dir / info.directory / "passages.parquet")
        for name in cols:
            cols[name].extend(table.column(name).to_pylist())
    return cols


def index_vectors(index_dir: str | Path, rows: Sequence[int]) -> dict[int, np.ndarray]:
    """Stored vectors (float32) of rows numbered as in ``index_passages``, read from each shard's
    memory-mapped vectors.npy: only the pages of the rows asked for are read."""
    index_dir = resolve_index(index_dir)
    manifest = IndexManifest.read(index_dir)
    wanted = np.asarray(sorted(set(rows)), dtype=np.int64)
    out: dict[int, np.ndarray] = {}
    start = 0
    for info in manifest.shards:
        stored = np.load(index_dir / info.directory / "vectors.npy", mmap_mode="r", allow_pickle=False)
        mine = wanted[(wanted >= start) & (wanted < start + len(stored))]
        for r, v in zip(mine.tolist(), np.asarray(stored[mine - start], dtype=np.float32)):
            out[r] = v
        start += len(stored)
    return out


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """DPR's answer-string match: a normalised gold answer occurs as whole tokens in the text."""
    norm_text = f" {normalize_answer(text)} "
    return any(f" {a} " in norm_text for a in (normalize_answer(x) for x in answers) if a)


def recall_table(ranked_doc_ids: list[list[str]], ranked_texts: list[list[str]],
                 examples: Sequence[QAExample], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k by gold doc_id (questions that have one) and answer-string recall@k (all)."""
    out: dict[str, float] = {}
    with_gold = [i for i, e in enumerate(examples) if e.doc_id is not None]
    for k in ks:
        if with_gold:
            hits = sum(examples[i].doc_id in ranked_doc_ids[i][:k] for i in with_gold)
            out[f"recall@{k}"] = hits / len(with_gold)
        ans = sum(any(has_answer(t, e.answers) for t in ranked_texts[i][:k]) for i, e in enumerate(examples))
        out[f"answer_recall@{k}"] = ans / len(examples)
    return out


def bm25_rankings(passages: dict[str, list[str]], questions: Sequence[str], k: int) -> tuple[list[list[int]], float]:
    """Row numbers of the BM25 top-k for each question (passages sharing no term with it left
    out), and seconds spent searching. One index over all passages: global IDF, unlike the
    per-shard BM25 of hybrid retrieval."""
    index = Bm25Index(passages["title"], passages["text"])
    start = time.perf_counter()
    _, rows = index.search(questions, k)
    return [[r for r in row if r >= 0] for row in rows.tolist()], time.perf_counter() - start


def gold_sources(ranked_doc_ids: list[list[str]], ranked_sources: list[list[str]], examples: Sequence[QAExample],
                 ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """Per k, among questions whose gold doc is in the hybrid top-k (``found``): the share whose
    best-ranked gold passage came from the dense list only, the BM25 list only, or both."""
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        counts = dict.fromkeys(SOURCES[1:], 0)
        for i, e in enumerate(examples):
            ids = ranked_doc_ids[i][:k]
            if e.doc_id is not None and e.doc_id in ids:
                counts[ranked_sources[i][ids.index(e.doc_id)]] += 1
        found = sum(counts.values())
        out[f"@{k}"] = {"found": found, **{s: c / found if found else 0.0 for s, c in counts.items()}}
    return out


def recall_intervals(ranked_doc_ids: list[list[str]], examples: Sequence[QAExample],
                     ks: Sequence[int] = KS) -> dict[str, list[float]]:
    """95% bootstrap interval of recall@k by gold doc (questions that have one), per k."""
    from rag_ray.metrics import bootstrap_ci95

    with_gold = [i for i, e in enumerate(examples) if e.doc_id is not None]
    if not with_gold:
        return {}
    return {f"recall@{k}": list(bootstrap_ci95([float(examples[i].doc_id in ranked_doc_ids[i][:k])
                                                 for i in with_gold])) for k in ks}


def evaluate_retrieval(retriever, query_encoder, examples: Sequence[QAExample], index_dir: str | Path,
                       ks: Sequence[int] = KS, batch_size: int = 64, bm25: bool = True, hybrid: bool = False,
                       lexical_k: int | None = None, reranker=None, rerank_candidates: int = 20) -> dict:
    """Dense (through the sharded retriever) and BM25 recall tables for the same questions;
    ``hybrid`` adds the fused retriever's table and where its gold hits came from; a ``reranker``
    adds a "reranked" table: the hybrid (else dense) top ``rerank_candidates``, searched for as
    RagPipeline does, in the reranker's order, and the rest of the longer list after them."""
    k = max(ks)
    exact_dense = retriever.manifest.index_type == "flat"  # its top n is the head of its top k
    questions = [e.question for e in examples]
    doc_ids: list[list[str]] = []
    texts: list[list[str]] = []
    fused: dict[str, list[list[str]]] = {"doc_ids": [], "texts": [], "sources": []}
    reranked: dict[str, list[list[str]]] = {"doc_ids": [], "texts": []}
    start, encode_s, hybrid_s, rerank_s = time.perf_counter(), 0.0, 0.0, 0.0
    for i in range(0, len(questions), batch_size):
        t0 = time.perf_counter()
        q = query_encoder.encode(questions[i : i + batch_size])
        encode_s += time.perf_counter() - t0
        res = retriever.search(q, k, vectors=False)
        dense_hits = res.hits
        doc_ids += [[h.doc_id for h in hits] for hits in res.hits]
        texts += [[h.text for h in hits] for hits in res.hits]
        if hybrid:
            t1 = time.perf_counter()
            res = retriever.search(q, k, vectors=False, questions=questions[i : i + batch_size], lexical_k=lexical_k)
            hybrid_s += time.perf_counter() - t1
            for name, attr in (("doc_ids", "doc_id"), ("texts", "text"), ("sources", "source")):
                fused[name] += [[getattr(h, attr) for h in hits] for hits in res.hits]
        if reranker is not None:  # its own search for its candidates, as RagPipeline makes it
            t2 = time.perf_counter()
            chunk = questions[i : i + batch_size]
            if exact_dense and not hybrid and rerank_candidates <= k:  # the head of the top k just fetched
                heads = [hits[:rerank_candidates] for hits in dense_hits]
            else:  # a fused list, or an approximate index, depends on how many are asked for
                heads = retriever.search(q, rerank_candidates, vectors=False,
                                         **({"questions": chunk, "lexical_k": lexical_k} if hybrid else {})).hits
            for hits, head, order in zip(res.hits, heads, reranker.order(chunk, heads)):
                seen = {h.passage_id for h in head}  # below them, the rest of the (longer) list
                ranked = [head[j] for j in order] + [h for h in hits if h.passage_id not in seen]
                reranked["doc_ids"].append([h.doc_id for h in ranked])
                reranked["texts"].append([h.text for h in ranked])
            rerank_s += time.perf_counter() - t2
        if (i // batch_size) % 5 == 4:
            done = i + batch_size
            log.info("dense retrieval: %d/%d questions (%.1f q/s)", done, len(questions),
                     done / (time.perf_counter() - start))
    dense_s = time.perf_counter() - start - hybrid_s - rerank_s
    report = {"questions": len(examples), "index": str(index_dir), "k": list(ks),
              "dense": recall_table(doc_ids, texts, examples, ks),
              "dense_ci95": recall_intervals(doc_ids, examples, ks),
              "dense_seconds": {"total": round(dense_s, 2), "encode": round(encode_s, 2),
                                "search": round(dense_s - encode_s, 2)}}
    if hybrid:
        report["hybrid"] = recall_table(fused["doc_ids"], fused["texts"], examples, ks)
        report["hybrid_ci95"] = recall_intervals(fused["doc_ids"], examples, ks)
        report["hybrid_sources"] = gold_sources(fused["doc_ids"], fused["sources"], examples, ks)
        report["hybrid_seconds"] = round(hybrid_s, 2)
    if reranker is not None:
        report["reranked"] = recall_table(reranked["doc_ids"], reranked["texts"], examples, ks)
        report["reranked_ci95"] = recall_intervals(reranked["doc_ids"], examples, ks)
        report["reranked_seconds"] = round(rerank_s, 2)
        report["rerank_candidates"] = rerank_candidates
        report["rerank_prior"] = reranker.rank_prior
    if bm25:
        passages = index_passages(index_dir)
        rows, bm25_s = bm25_rankings(passages, questions, k)
        ranked = [[passages["doc_id"][r] for r in rr] for rr in rows]
        report["bm25"] = recall_table(ranked, [[passages["text"][r] for r in rr] for rr in rows], examples, ks)
        report["bm25_ci95"] = recall_intervals(ranked, examples, ks)
        report["bm25_seconds"] = round(bm25_s, 2)
    return report


def exact_recall(query_encoder, passage_encoder, examples: Sequence[QAExample], index_dir: str | Path,
                 ks: Sequence[int] = KS, batch_size: int = 64) -> dict:
    """Dense recall as a rebuilt index would give it, without building one: every passage of
    ``index_dir`` re-embedded with ``passage_encoder`` and searched exactly (inner product) in
    memory. How passage-encoder training scores itself; the same keys as ``evaluate_retrieval``."""
    from rag_ray.corpus import embedding_text

    passages = index_passages(index_dir)
    docs = passage_encoder.encode([embedding_text(t, x) for t, x in zip(passages["title"], passages["text"])],
                                  batch_size=batch_size)
    queries = query_encoder.encode([e.question for e in examples], batch_size=batch_size)
    k = min(max(ks), len(docs))
    top = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]
    doc_ids = [[passages["doc_id"][r] for r in row] for row in top]
    texts = [[passages["text"][r] for r in row] for row in top]
    return {"questions": len(examples), "index": str(index_dir), "k": list(ks),
            "dense": recall_table(doc_ids, texts, examples, ks), "dense_ci95": recall_intervals(doc_ids, examples, ks)}


def format_table(report: dict) -> str:
    systems = [s for s in ("dense", "bm25", "hybrid", "reranked") if s in report]
    keys = list(report["dense"].keys())
    lines = [f"{'metric':<20}" + "".join(f"{s:>10}" for s in systems)]
    for key in keys:
        lines.append(f"{key:<20}" + "".join(f"{report[s][key]:>10.3f}" for s in systems))
    if "hybrid_sources" in report:
        lines.append(f"{'hybrid gold hit from':<20}" + "".join(f"{s:>10}" for s in (*SOURCES[1:], "found")))
        for at, row in report["hybrid_sources"].items():
            lines.append(f"{'  top' + at[1:]:<20}" + "".join(f"{row[s]:>10.3f}" for s in SOURCES[1:])
                         + f"{row['found']:>10d}")
    lines.append(f"({report['questions']} questions, index {report['index']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- answers

def evaluate_qa(model, retriever, examples: Sequence[dict], *, mode: str, n_docs: int, decoding: str | None = None,
                num_beams: int = 1, max_new_tokens: int = 16, batch_size: int = 16, span_recovery: bool = True,
                hybrid: bool = False, lexical_k: int | None = None, gold_passage: bool = False,
                rerank: bool = True, keep_predictions: bool = False) -> dict:
    """Dev metrics of a RAG model on rows {question, answers, doc_id}:

    EM / F1 of the generated answers (SQuAD normalisation), the answer NLL -log p(y|x) of the first
    gold answer under the model's own marginalisation (closed-book: the generator alone), and
    recall@1 / @5 / @n_docs of the retrieved passages by gold document (retrieval asks for
    max(5, n_docs) passages; the model reads the first n_docs). Each question is embedded once:
    the same vector searches, generates and scores. ``span_recovery``: answers read back from the
    passage that holds them (RagPipeline's), as the CLI and Serve return them. ``hybrid``: BM25
    candidates fused with the dense ones (RagPipeline's). ``rerank``: a model with a reranker reads
    its top n_docs of ``rerank_candidates`` (RagPipeline's). ``gold_passage``: no search; each question is
    read from its gold passage alone (rows from ``with_index_gold_passages``), K=1: the
    reader's ceiling, what retrieval cannot improve on. ``keep_predictions``: the report also holds
    "predictions", one {question, answers, prediction, em, f1} per question, for paired comparisons.
    """
    import torch

    from rag_ray.metrics import bootstrap_ci95, exact_match, f1_score
    from rag_ray.pipeline import RagPipeline

    mode = Mode.parse(mode)
    pipeline = RagPipeline(model, retriever, span_recovery=span_recovery, hybrid=hybrid, lexical_k=lexical_k,
                           rerank=rerank)
    was_training = model.training
    model.eval()
    k = max(5, n_docs)
    nll = 0.0
    em: list[float] = []
    f1: list[float] = []
    predictions: list[dict] = []
    hits: dict[int, list[float]] = {1: [], 5: [], n_docs: []}
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            rows = examples[i : i + batch_size]
            questions = [r["question"] for r in rows]
            vectors = pipeline.embed(questions)
            if gold_passage:
                res = gold_result(rows, vectors)
            else:
                res = pipeline.search(questions, vectors, k) if mode.retrieves else None
            answers = pipeline.read(questions, vectors, res, mode=mode, n_docs=n_docs, decoding=decoding,
                                    num_beams=num_beams, max_new_tokens=max_new_tokens)
            q = torch.from_numpy(vectors).to(model.device)
            out = model.loss(questions, [list(r["answers"])[0] for r in rows], res.hits if res else None,
                             res.vectors if res else None, mode=mode, n_docs=n_docs, question_vectors=q)
            nll += float(out.nll.sum())
            for j, (r, a) in enumerate(zip(rows, answers)):
                golds = list(r["answers"])
                em.append(exact_match(a.answer, golds))
                f1.append(f1_score(a.answer, golds))
                if keep_predictions:
                    predictions.append({"question": r["question"], "answers": golds, "prediction": a.answer,
                                        "em": em[-1], "f1": f1[-1]})
                if res is not None and r.get("doc_id") and not gold_passage:
                    for kk in hits:
                        hits[kk].append(float(any(h.doc_id == r["doc_id"] for h in res.hits[j][:kk])))
    model.train(was_training)
    n = max(1, len(examples))
    out = {"dev_em": sum(em) / n, "dev_f1": sum(f1) / n, "dev_nll": nll / n, "dev_questions": len(examples),
           "dev_seconds": round(time.perf_counter() - start, 1)}
    scores = {"dev_em": em, "dev_f1": f1}
    if hits[5]:
        out.update({f"dev_recall@{kk}": sum(v) / len(v) for kk, v in hits.items()})
        scores.update({f"dev_recall@{kk}": v for kk, v in hits.items()})
    # 95% bootstrap intervals over the questions, e.g. "dev_em_ci95": [lo, hi]
    out.update({f"{name}_ci95": list(bootstrap_ci95(v)) for name, v in scores.items() if v})
    if keep_predictions:
        out["predictions"] = predictions
    return out


def read_predictions(path: str | Path) -> list[dict]:
    """An ``eval-qa --predictions`` file; errors name the file, line and field."""
    from rag_ray.io import iter_jsonl

    if not Path(path).is_file():
        raise RagRayError(f"predictions file {path} does not exist")
    rows = []
    for n, row in iter_jsonl(path):
        for name in ("question", "em", "f1"):
            if name not in row:
                raise RagRayError(f"{path}, line {n}: no field {name!r} (write the file with eval-qa --predictions)")
        rows.append(row)
    if not rows:
        raise RagRayError(f"{path} holds no predictions")
    return rows


def compare_predictions(a: str | Path, b: str | Path) -> dict:
    """EM and F1 of two ``eval-qa --predictions`` files of the same questions in the same order (so
    repeated questions pair up too), and the paired 95%
    interval of each difference (a - b): the two systems are separated where it excludes 0."""
    from rag_ray.metrics import bootstrap_ci95, paired_bootstrap_ci95

    rows_a, rows_b = read_predictions(a), read_predictions(b)
    if len(rows_a) != len(rows_b):
        raise RagRayError(f"{a} ({len(rows_a)} questions) and {b} ({len(rows_b)}) must score the same questions: "
                          f"compare two eval-qa runs of the same question file")
    for n, (ra, rb) in enumerate(zip(rows_a, rows_b), start=1):
        if ra["question"] != rb["question"]:
            raise RagRayError(f"{a} and {b} must score the same questions in the same order; line {n} differs: "
                              f"{ra['question']!r} vs {rb['question']!r}")
    report: dict = {"questions": len(rows_a)}
    for metric in ("em", "f1"):
        x, y = [float(r[metric]) for r in rows_a], [float(r[metric]) for r in rows_b]
        lo, hi = paired_bootstrap_ci95(x, y)
        report[metric] = {"a": sum(x) / len(x), "a_ci95": list(bootstrap_ci95(x)), "b": sum(y) / len(y),
                          "b_ci95": list(bootstrap_ci95(y)), "difference": (sum(x) - sum(y)) / len(x),
                          "difference_ci95": [lo, hi], "separated": bool(lo > 0 or hi < 0)}
    return report


def gold_passage(answer: str, candidates: Sequence[T], text: Callable[[T], str]) -> T | None:
    """The first of a document's passages whose text holds the answer (case-insensitive): what
    the gold-passage ceiling and both warm-ups (reader, retriever) take as a question's gold passage."""
    answer = answer.lower()
    return next((c for c in candidates if answer in text(c).lower()), None)


def index_gold_rows(rows: Sequence[dict], passages: dict[str, list[str]]) -> list[int | None]:
    """For each row {answer, doc_id}, the number (as in ``index_passages``) of its gold passage:
    the index passage of its doc_id that holds the answer; None where there is none (an unknown
    doc_id, or an answer that straddles a passage cut)."""
    rows_of_doc: dict[str, list[int]] = {}
    for r, doc in enumerate(passages["doc_id"]):
        rows_of_doc.setdefault(doc, []).append(r)
    return [gold_passage(row["answer"], rows_of_doc.get(row["doc_id"], []), lambda r: passages["text"][r])
            for row in rows]


def gold_fields(passages: dict[str, list[str]], r: int, vector: np.ndarray) -> dict:
    """The ``positive_*`` fields of a row whose gold passage is index passage ``r`` (with its
    stored vector): what ``gold_hit``, ``gold_result`` and training's gold-in-top-K read."""
    return {"positive_id": passages["passage_id"][r], "positive": vector, "positive_doc": passages["doc_id"][r],
            "positive_title": passages["title"][r], "positive_text": passages["text"][r]}


def with_index_gold_passages(rows: list[dict], index: str | Path) -> tuple[list[dict], int]:
    """Rows {answer, doc_id, ...} with their gold passage's ``gold_fields``; rows without one are
    dropped and counted."""
    passages = index_passages(index)
    gold = index_gold_rows(rows, passages)
    vectors = index_vectors(index, [g for g in gold if g is not None])
    out = [{**row, **gold_fields(passages, g, vectors[g])} for row, g in zip(rows, gold) if g is not None]
    return out, len(rows) - len(out)


def gold_hit(row: dict, score: float) -> Hit:
    """A question's gold passage (its ``gold_fields``) as a hit."""
    return Hit(str(row["positive_id"]), str(row["positive_doc"]), str(row["positive_title"]),
               str(row["positive_text"]), score, source="gold")


def gold_result(rows: Sequence[dict], question_vectors: np.ndarray) -> SearchResult:
    """Each row's gold passage (its ``gold_fields``) as its only
    hit, scored q·d with its stored vector, as a search would have returned it."""
    gold = np.stack([np.asarray(r["positive"], dtype=np.float32) for r in rows])
    scores = np.einsum("bd,bd->b", np.asarray(question_vectors, dtype=np.float32), gold)
    hits = [[gold_hit(r, float(s))] for r, s in zip(rows, scores)]
    return SearchResult(hits, gold[:, None, :])


def run_eval(cfg: EvalConfig) -> dict:
    """The QA evaluation job, as ``rag-ray eval-qa`` and ``jobs/evaluate.py`` run it: load the model
    and (when its mode retrieves, or ``cfg.retrieval`` asks for the dense vs. BM25 table) the index
    (``cfg.index``, else the one the model was trained against), each copied locally first when
    given as a URI; score the questions; return the report, also written to ``cfg.report`` if set."""
    import json

    from rag_ray.datasets import read_questions
    from rag_ray.io import atomic_write_text, local_copy
    from rag_ray.jobs import local_index
    from rag_ray.model import RagModel
    from rag_ray.retriever import Retriever
    from rag_ray.runtime import init_ray_from

    examples = read_questions(cfg.questions, limit=cfg.limit)
    model = RagModel.from_pretrained(str(local_copy(cfg.model)))
    if cfg.doc_score_scale is not None:
        model.set_doc_score_scale(cfg.doc_score_scale)
    if cfg.rerank_prior is not None:
        model.set_rerank_prior(cfg.rerank_prior)
    mode = Mode.parse(cfg.mode or model.config.mode)
    n_docs = cfg.n_docs or model.config.n_docs
    index = retriever = None
    if mode.retrieves or cfg.retrieval:
        index = cfg.index or (model.metadata.get("index") or {}).get("path")
        if not index:
            raise RagRayError(f"mode {mode.value!r} retrieves passages: give --index (index: in a config)")
        index = local_index(index)
        if not cfg.gold_passage:  # the gold passages are read from the index's files, no search
            init_ray_from(cfg.ray)
            retriever = Retriever.load(index, query_encoder=model.query_encoder)
    try:
        rows = [{"question": e.question, "answers": list(e.answers), "doc_id": e.doc_id or ""} for e in examples]
        dropped = 0
        if cfg.gold_passage:
            rows, dropped = with_index_gold_passages([{**r, "answer": r["answers"][0]} for r in rows if r["answers"]],
                                                     index)
            if not rows:
                raise RagRayError(f"--gold-passage: none of the {len(examples)} questions has a gold passage in "
                                  f"{index} (a question needs a doc_id of the index with a passage holding its answer)")
            n_docs = 1
        report = evaluate_qa(model, retriever, rows, mode=mode, n_docs=n_docs, decoding=cfg.decoding,
                             num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                             span_recovery=cfg.span_recovery, hybrid=cfg.hybrid, lexical_k=cfg.lexical_k,
                             gold_passage=cfg.gold_passage, rerank=cfg.rerank,
                             keep_predictions=cfg.predictions is not None)
        predictions = report.pop("predictions", None)
        if predictions is not None:
            atomic_write_text(cfg.predictions, "".join(json.dumps(p) + "\n" for p in predictions))
        if cfg.gold_passage:
            report["dev_without_gold_passage"] = dropped
        if cfg.retrieval:
            reranker = model.reranker if cfg.rerank else None
            report["retrieval"] = evaluate_retrieval(retriever, model.query_encoder, examples, index, hybrid=cfg.hybrid,
                                                     lexical_k=cfg.lexical_k, reranker=reranker,
                                                     rerank_candidates=model.config.rerank_candidates)
    finally:
        if retriever is not None:
            retriever.shutdown()
    if model.reranker is not None:
        report["rerank_prior"] = model.reranker.rank_prior
    report.update({"model": cfg.model, "mode": mode.value, "n_docs": n_docs, "doc_score_scale": model.doc_score_scale,
                   "reranked": bool(cfg.rerank and model.reranker is not None and mode.retrieves
                                    and not cfg.gold_passage)})
    if cfg.report:
        atomic_write_text(cfg.report, json.dumps(report, indent=2))
    return report
