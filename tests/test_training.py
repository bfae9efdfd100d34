"""Ray Train joint fine-tuning on a real local Ray: tiny model, toy corpus, 2 gloo workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TOY_QUESTIONS, build_tiny_rag, registered_checkpoints, write_jsonl
from rag_ray.config import TrainConfig, load_config
from rag_ray.corpus import read_passages
from rag_ray.encoders import DEFAULT_ENCODER
from rag_ray.errors import RagRayError
from rag_ray.model import RagModel
from rag_ray.retriever import Retriever
from rag_ray.types import Passage
from rag_ray.training import run_training


@pytest.fixture(scope="module")
def setup(ray_local, toy_corpus, tmp_path_factory):
    """A tiny passage encoder, the toy index built with it, and a tiny RAG model to start from."""
    root = tmp_path_factory.mktemp("train")
    build_tiny_rag(root, toy_corpus, n_docs=2)
    questions = write_jsonl(root / "q.jsonl", TOY_QUESTIONS * 4)  # 20 rows: 10 per worker
    return root, questions


def _cfg(root: Path, questions: str, name: str, overrides: dict | None = None) -> TrainConfig:
    """The tests' run: 2 workers x 24 steps of batch 2; ``overrides`` use dotted keys (``optim.lr``)."""
    base = {"index": str(root / "index"), "data.train": questions, "data.dev": questions,
            "model.init_from": str(root / "init_model"), "model.mode": "sequence", "model.n_docs": 2,
            "optim.batch_size": 2, "optim.lr": 3e-3, "optim.query_encoder_lr": 3e-3, "optim.warmup_steps": 0,
            "optim.max_steps": 24, "eval.every": 12, "checkpoint.every": 12, "eval.questions": 5,
            "scaling.num_workers": 2, "checkpoint.storage_path": str(root / "runs"), "checkpoint.name": name,
            "checkpoint.max_failures": 0, "scaling.torch_threads": 1}
    return load_config(TrainConfig, overrides={**base, **(overrides or {})})


def _mean_loss(model_dir, root, questions) -> float:
    model = RagModel.from_pretrained(model_dir, device="cpu")
    retriever = Retriever.load(root / "index")
    qs = [q["question"] for q in TOY_QUESTIONS]
    res = retriever.search(model.query_encoder.encode(qs), 2)
    with torch.no_grad():
        out = model.loss(qs, [q["answers"][0] for q in TOY_QUESTIONS], res.hits, res.vectors, mode="sequence")
    retriever.shutdown()
    return float(out.loss)


@pytest.fixture(scope="module")
def trained(setup):
    """One 2-worker run, shared by the tests that inspect its report and checkpoint."""
    root, questions = setup
    cfg = _cfg(root, questions, "lower", {"log_retrievals": True})
    return cfg, run_training(cfg)


def test_two_workers_lower_the_loss_write_a_checkpoint_and_resume(setup, trained):
    root, questions = setup
    _, report = trained
    m = report["metrics"]
    assert m["step"] == 24 and m["world_size"] == 2 and m["samples"] == 24 * 2 * 2
    assert {"dev_em", "dev_f1", "dev_recall@2", "time_retrieve_s", "time_backward_s"} <= set(m)
    before = _mean_loss(root / "init_model", root, questions)
    after = _mean_loss(report["model"], root, questions)
    assert after < 0.7 * before, (before, after)
    # the scale on q·d is trained with the rest: it left its starting value and was saved
    init_scale = RagModel.from_pretrained(root / "init_model", device="cpu").doc_score_scale
    assert init_scale == pytest.approx(20.0)
    assert abs(RagModel.from_pretrained(report["model"], device="cpu").doc_score_scale - init_scale) > 1e-3

    # Retrieval inside training is the Retriever client's: same passages for the first batch.
    logged = m["retrieval_log"][0]
    init = RagModel.from_pretrained(root / "init_model", device="cpu")
    retriever = Retriever.load(root / "index")
    res = retriever.search(init.query_encoder.encode(logged["questions"]), 2)
    assert logged["passage_ids"] == [[h.passage_id for h in hits] for hits in res.hits]
    retriever.shutdown()

    resumed = run_training(_cfg(root, questions, "resumed", {"checkpoint.resume_from": report["checkpoint"],
                                                            "optim.max_steps": 30}))
    assert resumed["metrics"]["resumed_from_step"] == 24 and resumed["metrics"]["step"] == 30


def test_a_checkpoint_records_its_train_config_and_index(setup, trained):
    from rag_ray.config import to_dict
    from rag_ray.manifest import index_identity

    root, _ = setup
    cfg, report = trained
    metadata = RagModel.from_pretrained(report["model"], device="cpu").metadata
    assert metadata["train_config"] == to_dict(cfg) == report["config"]
    assert load_config(TrainConfig, overrides=metadata["train_config"]) == cfg  # the run, rebuilt from the model
    assert metadata["index"] == index_identity(root / "index")
    assert metadata["index"]["manifest_sha256"] and metadata["index"]["version"]


def test_optimizer_groups_state_their_learning_rates(setup):
    from rag_ray.training import build_model, build_optimizer

    root, questions = setup
    cfg = _cfg(root, questions, "groups", {"optim.lr": 2e-4, "optim.query_encoder_lr": 1e-5})
    model = build_model(cfg, torch.device("cpu"))
    optimizer, _ = build_optimizer(model, cfg)
    # generator, copy head (copy_head_lr None: optim.lr), query encoder, scale on q·d
    assert [g["initial_lr"] for g in optimizer.param_groups] == [2e-4, 2e-4, 1e-5, 2e-4]
    head = {id(p) for p in model.generator.model.head_parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == head
    assert optimizer.param_groups[3]["params"] == [model.log_doc_score_scale]
    assert optimizer.param_groups[3]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] > 0
    cfg = _cfg(root, questions, "groups", {"optim.copy_head_lr": 3e-3, "model.freeze_query_encoder": True,
                                           "model.learn_doc_score_scale": False, "model.doc_score_scale": 7.0})
    model = build_model(cfg, torch.device("cpu"))
    optimizer, _ = build_optimizer(model, cfg)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [3e-3, 3e-3]  # no query-encoder or scale group
    assert model.doc_score_scale == pytest.approx(7.0)  # an explicit scale overrides init_from's


def test_eval_qa_cli_scores_a_trained_model(setup, capsys):
    import json

    from rag_ray.cli import main

    root, questions = setup
    init = str(root / "init_model")
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--limit", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dev_questions"] == 5 and report["mode"] == "sequence" and report["n_docs"] == 2
    assert 0 <= report["dev_em"] <= 1 and report["dev_nll"] > 0 and 0 <= report["dev_recall@5"] <= 1
    assert report["doc_score_scale"] == pytest.approx(RagModel.from_pretrained(init, device="cpu").doc_score_scale)
    # the scale's ablation: same passages, p(z|x) read at scale 1, so the answer NLL moves
    preds = [str(root / "scaled.jsonl"), str(root / "unscaled.jsonl")]
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--limit", "5", "--json", "--predictions", preds[0]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dev_em"] == report["dev_em"]
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--limit", "5", "--json", "--doc-score-scale", "1", "--predictions", preds[1]]) == 0
    unscaled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert unscaled["doc_score_scale"] == 1.0 and unscaled["dev_recall@5"] == report["dev_recall@5"]
    assert unscaled["dev_nll"] != pytest.approx(report["dev_nll"], rel=1e-3)
    # each question's prediction, then the paired comparison of the two runs
    rows = [json.loads(line) for line in Path(preds[0]).read_text().splitlines()]
    assert [r["question"] for r in rows] == [q["question"] for q in TOY_QUESTIONS[:5]]
    assert sum(r["em"] for r in rows) / 5 == pytest.approx(report["dev_em"])
    assert sum(r["f1"] for r in rows) / 5 == pytest.approx(report["dev_f1"])
    assert main(["compare", preds[0], preds[1], "--json"]) == 0
    compared = json.loads(capsys.readouterr().out.strip())
    assert compared["questions"] == 5
    em = compared["em"]
    assert em["a"] == pytest.approx(report["dev_em"]) and em["b"] == pytest.approx(unscaled["dev_em"])
    assert em["difference_ci95"][0] <= em["difference"] <= em["difference_ci95"][1]
    Path(preds[1]).write_text("".join(line + "\n" for line in Path(preds[1]).read_text().splitlines()[:4]))
    assert main(["compare", preds[0], preds[1]]) == 2
    assert "must score the same questions" in capsys.readouterr().err
    Path(preds[1]).write_text('{"question": "q"}\n')
    assert main(["compare", preds[0], preds[1]]) == 2
    assert "line 1: no field 'em'" in capsys.readouterr().err
    assert main(["eval-qa", "--model", init, "--questions", questions]) == 2
    assert "give --index" in capsys.readouterr().err
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--doc-score-scale", "0"]) == 2
    assert "doc_score_scale" in capsys.readouterr().err


def test_eval_qa_gold_passage_reads_each_question_from_its_gold_passage_alone(setup, capsys):
    """The ceiling row: every question is read from the index passage of its doc that holds the
    answer, K=1, so p(z|x) = 1 and the NLL is the reader's own on that passage."""
    import json

    from rag_ray.cli import main
    from rag_ray.evaluation import index_passages

    root, questions = setup
    init = str(root / "init_model")
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--limit", "5", "--gold-passage", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_docs"] == 1 and report["dev_questions"] == 5 and report["dev_without_gold_passage"] == 0
    assert "dev_recall@1" not in report  # nothing was searched
    model = RagModel.from_pretrained(init, device="cpu")
    passages = index_passages(root / "index")
    qs = [q["question"] for q in TOY_QUESTIONS]
    gold = [[next(Passage(p, d, t, x) for p, d, t, x in zip(*passages.values())
                  if d == q["doc_id"] and q["answers"][0].lower() in x.lower())] for q in TOY_QUESTIONS]
    zeros = torch.zeros(len(qs), model.query_encoder.dim)
    with torch.no_grad():
        nll = model.loss(qs, [q["answers"][0] for q in TOY_QUESTIONS], gold, zeros[:, None], n_docs=1,
                         question_vectors=zeros).nll
    assert report["dev_nll"] == pytest.approx(float(nll.mean()), rel=1e-3)
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", questions,
                 "--gold-passage", "--hybrid"]) == 2
    assert "gold_passage" in capsys.readouterr().err
    nowhere = write_jsonl(root / "q_nowhere.jsonl", [{**TOY_QUESTIONS[0], "doc_id": "nowhere"}])
    assert main(["eval-qa", "--model", init, "--index", str(root / "index"), "--questions", nowhere,
                 "--gold-passage"]) == 2
    assert "none of the 1 questions has a gold passage" in capsys.readouterr().err


def test_gold_in_top_k_replaces_the_last_hit_only_where_retrieval_missed_it(setup):
    import numpy as np

    from rag_ray.datasets import QAExample
    from rag_ray.evaluation import index_passages
    from rag_ray.training import qa_rows, with_gold_in_top_k, with_retrieval_targets
    from rag_ray.types import Hit, SearchResult

    root, _ = setup
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS[:2]]
    rows, _ = with_retrieval_targets(qa_rows(examples), str(root / "index"), 0)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    passages = index_passages(root / "index")
    hit = lambda r: Hit(passages["passage_id"][r], passages["doc_id"][r], passages["title"][r], passages["text"][r], 0.5)
    row_of = {pid: r for r, pid in enumerate(passages["passage_id"])}
    others = [r for r in range(len(row_of)) if passages["doc_id"][r] not in {e.doc_id for e in examples}]
    # question 0 retrieved two distractors; question 1 already has its gold passage first
    hits = [[hit(others[0]), hit(others[1])], [hit(row_of[rows[1]["positive_id"]]), hit(others[2])]]
    vectors = np.arange(2 * 2 * 32, dtype=np.float32).reshape(2, 2, 32)
    forced = with_gold_in_top_k(SearchResult(hits, vectors), batch)
    assert forced.hits[0][0] == hits[0][0] and forced.hits[0][1].passage_id == rows[0]["positive_id"]
    assert forced.hits[0][1].source == "gold" and rows[0]["answer"] in forced.hits[0][1].text
    np.testing.assert_array_equal(forced.vectors[0, 1], rows[0]["positive"])
    np.testing.assert_array_equal(forced.vectors[0, 0], vectors[0, 0])
    assert forced.hits[1] == hits[1]
    np.testing.assert_array_equal(forced.vectors[1], vectors[1])
    np.testing.assert_array_equal(vectors[0, 1], np.arange(32, 64, dtype=np.float32))  # the input is not changed
    with pytest.raises(RagRayError, match="data.gold_in_top_k"):
        load_config(TrainConfig, overrides={"objective": "reader", "data.corpus": "x", "data.gold_in_top_k": True})


def test_killed_worker_recovers_from_the_last_checkpoint(setup):
    import os
    import signal

    import psutil

    root, questions = setup
    cfg = _cfg(root, questions, "chaos", {"optim.max_steps": 48, "checkpoint.every": 8, "eval.every": 1000,
                                          "checkpoint.max_failures": 2, "eval.questions": 0})
    killed: list[int] = []
    errors: list[BaseException] = []

    def killer():
        try:
            kill_one_worker_after_first_checkpoint()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def kill_one_worker_after_first_checkpoint():
        run_dir = root / "runs" / "chaos"
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # Kill only once the controller has registered a checkpoint (its snapshot lists one);
            # a checkpoint folder on disk alone may not be registered yet.
            if registered_checkpoints(run_dir):
                # Ray titles actor processes "ray::RayTrainWorker...": kill one of this test's train
                # workers, children of the raylet this process started (not another Ray's on the machine)
                raylets = {c.pid for c in psutil.Process().children()}
                workers = [p.pid for p in psutil.process_iter(["cmdline", "ppid"]) if p.info["ppid"] in raylets
                           and any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    return
            time.sleep(0.5)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = run_training(cfg)
    thread.join(timeout=5)
    assert not errors, errors
    assert killed, "no worker was killed: the run finished before its first checkpoint"
    assert report["metrics"]["step"] == 48
    assert report["metrics"]["resumed_from_step"] is not None and report["metrics"]["resumed_from_step"] >= 8


def test_closed_book_needs_no_index_and_bad_configs_fail_early(setup, tmp_path):
    root, questions = setup
    with pytest.raises(RagRayError, match="index: model.mode 'sequence' retrieves passages"):
        load_config(TrainConfig, overrides={"index": None})
    minilm_cfg = _cfg(root, questions, "mismatch", {"model.init_from": None, "model.query_encoder": DEFAULT_ENCODER})
    with pytest.raises(RagRayError, match="dimension 384 != index's 32"):
        run_training(minilm_cfg)
    report = run_training(_cfg(root, questions, "closed", {"model.mode": "closed_book", "index": None,
                                                           "optim.max_steps": 4, "scaling.num_workers": 1,
                                                           "eval.every": 4, "checkpoint.every": 4}))
    assert report["metrics"]["step"] == 4 and "dev_recall@2" not in report["metrics"]
    # trained against no index: its model says so
    assert RagModel.from_pretrained(report["model"], device="cpu").metadata["index"] is None


def test_gold_passages_are_the_cut_that_holds_the_answer(toy_corpus):
    from rag_ray.training import qa_rows, with_gold_passages
    from rag_ray.datasets import QAExample

    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]
    examples += [QAExample("Which word comes after word179?", ("word180",), "long"),
                 QAExample("Unknown document?", ("x",), "nowhere")]
    rows, dropped = with_gold_passages(qa_rows(examples), toy_corpus)
    assert dropped == 1 and len(rows) == 6
    long_row = rows[-1]
    assert "word180" in long_row["text"].split() and "word0" not in long_row["text"].split()
    assert rows[0]["title"] == "Paris" and "1889" in rows[0]["text"]
    with pytest.raises(RagRayError, match="no training question has a gold passage"):
        with_gold_passages(qa_rows(examples[-1:]), toy_corpus)


def test_reader_warm_up_learns_to_read_gold_passages(setup, toy_corpus):
    root, questions = setup
    report = run_training(_cfg(root, questions, "reader", {"objective": "reader", "data.corpus": toy_corpus,
                                                           "scaling.num_workers": 1, "optim.max_steps": 16,
                                                           "eval.every": 16, "checkpoint.every": 16}))
    m = report["metrics"]
    assert m["step"] == 16 and "dev_recall@2" in m  # evaluated as RAG-Sequence over the index
    assert RagModel.from_pretrained(report["model"], device="cpu").config.mode == "sequence"

    passages = read_passages(toy_corpus)

    def gold_nll(model_dir) -> float:
        model = RagModel.from_pretrained(model_dir, device="cpu")
        qs = [q["question"] for q in TOY_QUESTIONS]
        gold = [[next(h for h in passages if h.doc_id == q["doc_id"])] for q in TOY_QUESTIONS]
        zeros = torch.zeros(len(qs), model.query_encoder.dim)
        with torch.no_grad():
            out = model.loss(qs, [q["answers"][0] for q in TOY_QUESTIONS], gold, zeros[:, None], n_docs=1,
                             question_vectors=zeros)
        return float(out.loss)

    assert gold_nll(report["model"]) < 0.7 * gold_nll(root / "init_model")
    # the query encoder is not trained by a reader
    init, trained = RagModel.from_pretrained(root / "init_model"), RagModel.from_pretrained(report["model"])
    for a, b in zip(init.query_encoder.parameters(), trained.query_encoder.parameters()):
        assert torch.equal(a, b)



def test_retriever_targets_are_the_index_own_gold_passage_and_bm25_negatives(setup):
    """Each row's positive is the index passage of its doc that holds the answer, with the stored
    vector search uses; its hard negatives are BM25 passages of other docs without the answer."""
    import json

    import numpy as np

    from rag_ray.corpus import embedding_text
    from rag_ray.datasets import QAExample
    from rag_ray.evaluation import index_passages, index_vectors
    from rag_ray.training import qa_rows, with_retrieval_targets

    root, _ = setup
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]
    examples += [QAExample("Which word comes after word179?", ("word180",), "long"),
                 QAExample("Unknown document?", ("x",), "nowhere")]
    rows, dropped = with_retrieval_targets(qa_rows(examples), str(root / "index"), hard_negatives=2)
    assert dropped == 1 and len(rows) == 6
    passages = index_passages(root / "index")
    row_of = {pid: r for r, pid in enumerate(passages["passage_id"])}
    stored = index_vectors(root / "index", range(len(row_of)))
    for row in rows:
        gold = row_of[row["positive_id"]]
        assert passages["doc_id"][gold] == row["doc_id"] and row["answer"].lower() in passages["text"][gold].lower()
        np.testing.assert_array_equal(row["positive"], stored[gold])
        negatives = json.loads(row["negative_ids"])
        assert len(negatives) == 2 and row["negatives"].shape == (2, stored[gold].shape[0])
        for pid, vector in zip(negatives, row["negatives"]):
            assert passages["doc_id"][row_of[pid]] != row["doc_id"]
            assert row["answer"].lower() not in passages["text"][row_of[pid]].lower()
            np.testing.assert_array_equal(vector, stored[row_of[pid]])
    assert "word180" in passages["text"][row_of[rows[-1]["positive_id"]]].split()
    # the negatives' texts only where a trained passage encoder embeds them, as the index build would
    assert all("negative_texts" not in row for row in rows)
    with_texts, _ = with_retrieval_targets(qa_rows(examples), str(root / "index"), hard_negatives=2, texts=True)
    for row in with_texts:
        assert json.loads(row["negative_texts"]) == [embedding_text(passages["title"][row_of[pid]],
                                                                    passages["text"][row_of[pid]])
                                                     for pid in json.loads(row["negative_ids"])]
    with pytest.raises(RagRayError, match="no training question has a gold passage"):
        with_retrieval_targets(qa_rows(examples[-1:]), str(root / "index"), 1)


def _untuned_query_model(root: Path, seed: int, name: str) -> RagModel:
    """The tiny init model with its query encoder's weights re-drawn at random (so it ranks the
    toy questions' gold passages about at random), saved at ``root / name``."""
    untuned = RagModel.from_pretrained(root / "init_model", device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in untuned.query_encoder.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    untuned.save_pretrained(root / name)
    return untuned


def test_retriever_warm_up_raises_recall_where_the_untuned_encoder_ranks_gold_low(setup):
    """The query encoder starts from weights re-drawn at random, unrelated to the passage
    encoder's, so it ranks the toy questions' gold passages about at random; the retriever
    objective (in-batch + BM25 negatives, stored vectors) must lift recall@1, train the scale,
    and leave the generator as it was."""
    from rag_ray.datasets import QAExample
    from rag_ray.evaluation import evaluate_retrieval

    root, questions = setup
    untuned = _untuned_query_model(root, seed=123, name="untuned_query_model")
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]

    def recall_at_1(model_dir) -> float:
        retriever = Retriever.load(root / "index")
        try:
            model = RagModel.from_pretrained(model_dir, device="cpu")
            return evaluate_retrieval(retriever, model.query_encoder, examples, root / "index", ks=(1,),
                                      bm25=False)["dense"]["recall@1"]
        finally:
            retriever.shutdown()

    before = recall_at_1(root / "untuned_query_model")
    assert before <= 0.4, f"the untuned tiny encoder already finds the gold passages (recall@1 {before})"
    report = run_training(_cfg(root, questions, "retriever", {
        "objective": "retriever", "model.init_from": str(root / "untuned_query_model"), "data.hard_negatives": 1,
        "scaling.num_workers": 1, "optim.batch_size": 4, "optim.max_steps": 60, "eval.every": 60,
        "checkpoint.every": 60}))
    m = report["metrics"]
    assert m["step"] == 60 and "dev_recall@1" in m and "dev_em" not in m
    after = recall_at_1(report["model"])
    assert after >= before + 0.4 and after >= 0.8, (before, after)
    assert after == pytest.approx(m["dev_recall@1"])
    trained = RagModel.from_pretrained(report["model"])
    for a, b in zip(untuned.generator.parameters(), trained.generator.parameters()):
        assert torch.equal(a, b)
    assert trained.doc_score_scale != untuned.doc_score_scale


def test_passage_encoder_training_saves_a_tower_whose_rebuilt_index_gives_the_recall_it_reported(setup, toy_corpus):
    """DPR's two towers (``model.train_passage_encoder``): from a query encoder re-drawn at random,
    both towers learn from the passages' text; the run saves the passage encoder beside the model,
    and an index rebuilt with it (the real Ray Data build) returns the recall the run measured on
    passages it re-embedded in memory. The generator stays as it was."""
    from rag_ray.config import IndexConfig
    from rag_ray.datasets import QAExample
    from rag_ray.encoders import Encoder
    from rag_ray.evaluation import evaluate_retrieval
    from rag_ray.indexing import build_index

    root, questions = setup
    untuned = _untuned_query_model(root, seed=321, name="untuned_for_dpr")
    with pytest.raises(RagRayError, match="train_passage_encoder: applies to objective 'retriever'"):
        _cfg(root, questions, "x", {"model.train_passage_encoder": True, "model.mode": "closed_book"})
    report = run_training(_cfg(root, questions, "dpr", {
        "objective": "retriever", "model.init_from": str(root / "untuned_for_dpr"), "data.hard_negatives": 1,
        "model.train_passage_encoder": True, "scaling.num_workers": 1, "optim.batch_size": 4,
        "optim.max_steps": 60, "eval.every": 60, "checkpoint.every": 60}))
    m = report["metrics"]
    assert m["step"] == 60 and m["dev_recall@1"] >= 0.8, m
    trained_tower = Encoder.from_pretrained(report["passage_encoder"], device="cpu")
    frozen_tower = Encoder.from_pretrained(str(root / "passage_encoder"), device="cpu")
    assert (trained_tower.pooling, trained_tower.normalize) == ("mean", True)  # the index's, as saved
    assert any(not torch.equal(a, b) for a, b in zip(trained_tower.parameters(), frozen_tower.parameters()))

    build_index(load_config(IndexConfig, overrides={
        "corpus": [toy_corpus],
        "out": str(root / "index_dpr"), "shards": 2, "encoder.name": report["passage_encoder"],
        "encoder.precision": "fp32"}))
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]
    retriever = Retriever.load(root / "index_dpr")
    try:
        model = RagModel.from_pretrained(report["model"], device="cpu")
        rebuilt = evaluate_retrieval(retriever, model.query_encoder, examples, root / "index_dpr", ks=(1,),
                                     bm25=False)["dense"]["recall@1"]
    finally:
        retriever.shutdown()
    assert rebuilt == pytest.approx(m["dev_recall@1"])
    for a, b in zip(untuned.generator.parameters(), model.generator.parameters()):
        assert torch.equal(a, b)


def test_end_to_end_retriever_refreshes_the_index_it_searches(setup):
    """The rag objective with ``model.train_passage_encoder`` (the end-to-end retriever): p(z|x)
    scores the retrieved passages re-embedded by the passage encoder, so the answer loss trains it;
    every 4 steps and after the last, rank 0 rebuilds the index with it (the real Ray Data build)
    into the run's own root, and both workers search the new version. The last version's stored
    vectors are the saved encoder's, the run's dev recall is that version's, and the user's index
    is not written."""
    import numpy as np

    from rag_ray.corpus import embedding_text
    from rag_ray.datasets import QAExample
    from rag_ray.encoders import Encoder
    from rag_ray.evaluation import evaluate_retrieval, index_passages, index_vectors, read_predictions
    from rag_ray.manifest import IndexManifest, resolve_index

    root, questions = setup
    source = resolve_index(root / "index")
    source_files = sorted((str(f), f.stat().st_mtime_ns) for f in (root / "index").rglob("*"))
    with pytest.raises(RagRayError, match="index_refresh: applies to the rag objective with model.train_passage"):
        _cfg(root, questions, "x", {"index_refresh.every": 2})
    with pytest.raises(RagRayError, match="is the training's own index"):
        run_training(_cfg(root, questions, "x", {"model.train_passage_encoder": True,
                                                 "index_refresh.root": str(root / "index")}))
    report = run_training(_cfg(root, questions, "refresh", {
        "model.train_passage_encoder": True, "index_refresh.every": 4, "optim.max_steps": 10,
        "eval.every": 10, "checkpoint.every": 10, "eval.predictions": str(root / "refresh.predictions.jsonl")}))
    m = report["metrics"]
    assert m["step"] == 10 and m["index_refreshes"] == 3, m  # after steps 4 and 8, and the last
    # the last evaluation's predictions, one per dev question, agree with its EM (eval.predictions)
    rows = read_predictions(root / "refresh.predictions.jsonl")
    assert len(rows) == 5 and sum(r["em"] for r in rows) / 5 == pytest.approx(m["dev_em"])
    refreshed = Path(report["index"])
    assert refreshed.parent == (root / "runs" / "refresh" / "refresh-index").resolve()
    assert m["index"] == str(refreshed)
    assert sorted((str(f), f.stat().st_mtime_ns) for f in (root / "index").rglob("*")) == source_files
    manifest = IndexManifest.read(refreshed)
    assert manifest.passage_count == IndexManifest.read(source).passage_count and manifest.shard_count == 2

    # the passage encoder learned from the answer loss alone, and the last version is its embedding
    trained = Encoder.from_pretrained(report["passage_encoder"], device="cpu")
    start = Encoder.from_pretrained(str(root / "passage_encoder"), device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
    passages = index_passages(refreshed)
    rows = list(range(len(passages["passage_id"])))
    texts = [embedding_text(t, x) for t, x in zip(passages["title"], passages["text"])]
    stored = np.stack([index_vectors(refreshed, rows)[r] for r in rows])
    by_id = {pid: r for r, pid in enumerate(index_passages(source)["passage_id"])}
    stale = np.stack([index_vectors(source, [by_id[p] for p in passages["passage_id"]])[by_id[p]]
                      for p in passages["passage_id"]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=manifest.corpus["precision"] != "fp32"):
        now = trained.encode(texts)
    drift, error = np.abs(stale - now).max(), np.abs(stored - now).max()
    assert error < 0.2 * drift, (error, drift)

    # the run's own dev evaluation searched the refreshed version
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]
    model = RagModel.from_pretrained(report["model"], device="cpu")
    retriever = Retriever.load(refreshed)
    try:
        recall = evaluate_retrieval(retriever, model.query_encoder, examples, refreshed, ks=(2,),
                                    bm25=False)["dense"]["recall@2"]
    finally:
        retriever.shutdown()
    assert recall == pytest.approx(m["dev_recall@2"])


def test_shuffle_mixes_articles_in_every_batch_and_reshuffles_each_epoch(ray_local):
    """Question files are sorted by article; a shuffled epoch must not be a run of one article's
    questions. The dataset goes through Ray Data's streaming split, as get_dataset_shard's does."""
    from rag_ray.training import cycle_batches, train_dataset

    rows = [{"question": f"q{a}-{i}", "answer": "x", "doc_id": f"article{a:02d}"} for a in range(40) for i in range(25)]
    per_epoch, batch_size = len(rows) // 8, 8

    def epochs(shuffle: bool, n: int = 2) -> list[list[dict]]:
        cfg = load_config(TrainConfig, overrides={"shuffle": shuffle, "seed": 3, "optim.batch_size": batch_size})
        batches = cycle_batches(train_dataset(rows, cfg).streaming_split(1, equal=True)[0], batch_size)
        return [[next(batches) for _ in range(per_epoch)] for _ in range(n)]

    def distinct_articles(batches) -> list[int]:
        return [len(set(b["doc_id"].tolist())) for b in batches[:20]]

    file_order = epochs(False, n=1)[0]
    assert [q for b in file_order for q in b["question"].tolist()] == [r["question"] for r in rows]
    assert max(distinct_articles(file_order)) <= 2  # 25 questions per article: a batch spans at most two

    first, second = epochs(True)
    # 8 draws from 40 articles: about 7.3 distinct on average when the order is uniformly random
    assert sum(distinct_articles(first)) / 20 >= 6, distinct_articles(first)
    for epoch in (first, second):  # every row once per epoch
        assert sorted(q for b in epoch for q in b["question"].tolist()) == sorted(r["question"] for r in rows)
    order = [[q for b in epoch for q in b["question"].tolist()] for epoch in (first, second)]
    assert order[0] != order[1]  # a new order each epoch


def test_reranker_objective_puts_the_gold_passage_first_and_ships_inside_the_model(setup, capsys):
    """A query encoder that ranks the gold passages about at random; the reranker objective trains
    a tiny cross-encoder on the retriever's own candidates and must lift recall@1 of its order, save
    it inside the model (which every search of a RagPipeline then uses), and leave the query
    encoder and the generator as they were."""
    import numpy as np

    from rag_ray.datasets import QAExample
    from rag_ray.evaluation import evaluate_retrieval, index_passages, index_vectors
    from rag_ray.pipeline import RagPipeline

    from transformers import AutoModel

    from rag_ray.encoders import resolve_model_path
    from rag_ray.reranker import Reranker

    import json

    root, questions = setup
    untuned = _untuned_query_model(root, seed=123, name="untuned_for_reranker")
    examples = [QAExample(q["question"], tuple(q["answers"]), q["doc_id"]) for q in TOY_QUESTIONS]
    # MiniLM cut to one layer, 64 tokens, no dropout: pretrained token vectors let a cross-encoder
    # match question and passage words in a hundred steps (a tiny random BERT stalls for hundreds)
    AutoModel.from_pretrained(resolve_model_path(DEFAULT_ENCODER), num_hidden_layers=1, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0).save_pretrained(root / "minilm_1_layer")
    Reranker.from_pretrained(DEFAULT_ENCODER).tokenizer.save_pretrained(root / "minilm_1_layer")
    Reranker.from_pretrained(str(root / "minilm_1_layer"), max_length=64).save_pretrained(root / "reranker_init")
    report = run_training(_cfg(root, questions, "reranker", {
        "objective": "reranker", "model.init_from": str(root / "untuned_for_reranker"),
        "model.reranker": str(root / "reranker_init"), "model.rerank_candidates": 9, "data.hard_negatives": 3,
        "optim.lr": 1.5e-4, "optim.warmup_steps": 10, "scaling.num_workers": 1, "optim.batch_size": 4,
        "optim.max_steps": 150, "eval.every": 150, "checkpoint.every": 150}))
    m, report_model = report["metrics"], report["model"]
    assert m["step"] == 150 and "dev_recall@1" in m and "dev_em" not in m
    trained = RagModel.from_pretrained(report_model, device="cpu")
    assert trained.reranker is not None and trained.config.rerank_candidates == 9
    for a, b in [*zip(untuned.generator.parameters(), trained.generator.parameters()),
                 *zip(untuned.query_encoder.parameters(), trained.query_encoder.parameters())]:
        assert torch.equal(a, b)
    retriever = Retriever.load(root / "index")
    try:
        report = evaluate_retrieval(retriever, trained.query_encoder, examples, root / "index", ks=(1, 5), bm25=False,
                                    reranker=trained.reranker, rerank_candidates=9)
        before, after = report["dense"]["recall@1"], report["reranked"]["recall@1"]
        # an untrained score head orders the 9 passages at random (recall@1 about 0.1); the toy's
        # three short geography passages stay hard to tell apart for a one-layer model
        assert before <= 0.4 and after >= max(0.6, before + 0.4), (before, after)
        assert report["reranked"]["recall@5"] >= report["dense"]["recall@5"] + 0.4
        assert after == pytest.approx(m["dev_recall@1"]) and before == pytest.approx(m["dev_candidates_recall@1"])
        # a pipeline over the saved model reads the reranker's top k, each hit with its own stored vector
        pipeline = RagPipeline(trained, retriever)
        result = pipeline.retrieve([e.question for e in examples], k=2)
        assert [hits[0].doc_id for hits in result.hits] == [
            r[0] for r in evaluate_retrieval_orders(trained, retriever, examples)]
        passages = index_passages(root / "index")
        row_of = {pid: r for r, pid in enumerate(passages["passage_id"])}
        stored = index_vectors(root / "index", range(len(row_of)))
        for hits, vectors in zip(result.hits, result.vectors):
            for h, v in zip(hits, vectors):
                np.testing.assert_allclose(v, stored[row_of[h.passage_id]], rtol=1e-3, atol=1e-3)
        plain = RagPipeline(trained, retriever, rerank=False).retrieve([e.question for e in examples], k=2)
        dense = retriever.search(trained.query_encoder.encode([e.question for e in examples]), 2)
        assert [[h.passage_id for h in hits] for hits in plain.hits] == [[h.passage_id for h in hits]
                                                                         for hits in dense.hits]
    finally:
        retriever.shutdown()
    # a question longer than the reranker's window is cut with the passage, not refused
    assert len(trained.reranker.order(["why " * 300], [dense.hits[0]])[0]) == 2
    with pytest.raises(RagRayError, match="objective 'reranker'"):
        _cfg(root, questions, "x", {"objective": "reranker", "index": None})
    # eval-retrieval --reranker: the saved model's reranker and its 9 candidates; a model without one is refused
    from rag_ray.cli import main

    args = ["eval-retrieval", "--index", str(root / "index"), "--questions", questions, "--limit", "5", "--no-bm25",
            "--encoder", f"{report_model}/query_encoder", "--max-k", "5", "--json"]
    capsys.readouterr()
    assert main([*args, "--reranker", report_model]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert table["rerank_candidates"] == 9 and table["reranked"]["recall@1"] == pytest.approx(m["dev_recall@1"])
    assert main([*args, "--reranker", str(root / "untuned_for_reranker")]) == 2
    assert "has no reranker" in capsys.readouterr().err


def evaluate_retrieval_orders(model: RagModel, retriever: Retriever, examples) -> list[list[str]]:
    """The doc ids of each question's 9 candidates in the reranker's order, computed here from the
    reranker's scores of the dense top 9 (what RagPipeline must return the head of)."""
    questions = [e.question for e in examples]
    dense = retriever.search(model.query_encoder.encode(questions), 9, vectors=False)
    orders = model.reranker.order(questions, dense.hits)
    return [[hits[j].doc_id for j in order] for hits, order in zip(dense.hits, orders)]
