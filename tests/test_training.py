"""Ray Train joint fine-tuning on a real local Ray: tiny model, toy corpus, 2 gloo workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

from conftest import TOY_QUESTIONS, write_jsonl
from rag_ray.config import IndexConfig, TrainConfig, load_config
from rag_ray.corpus import read_passages
from rag_ray.encoders import DEFAULT_ENCODER, Encoder, resolve_model_path
from rag_ray.generator import Generator, PointerGenerator, _set_special_tokens
from rag_ray.indexing import build_index
from rag_ray.model import RagConfig, RagModel
from rag_ray.retriever import Retriever
from rag_ray.training import run_training


def _bert(tok, **kw) -> BertConfig:
    return BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def setup(ray_local, toy_corpus, tmp_path_factory):
    """A tiny passage encoder, the toy index built with it, and a tiny RAG model to start from."""
    root = tmp_path_factory.mktemp("train")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))
    torch.manual_seed(0)
    encoder = Encoder(BertModel(_bert(tok)), tok, name="tiny-dpr", pooling="mean", normalize=True, max_length=64)
    encoder.save_pretrained(root / "passage_encoder")
    build_index(load_config(IndexConfig, overrides={"corpus": [toy_corpus], "out": str(root / "index"), "shards": 2,
                                                   "encoder.name": str(root / "passage_encoder")}))
    ed = EncoderDecoderModel(encoder=BertModel(_bert(tok)), decoder=BertLMHeadModel(_bert(tok, is_decoder=True, add_cross_attention=True)))
    _set_special_tokens(ed, tok)
    generator = Generator(PointerGenerator(ed), tok, max_source_length=64, max_target_length=8)
    query_encoder = Encoder.from_pretrained(str(root / "passage_encoder"))
    RagModel(query_encoder, generator, RagConfig(n_docs=2)).save_pretrained(root / "init_model")
    questions = write_jsonl(root / "q.jsonl", TOY_QUESTIONS * 4)  # 20 rows: 10 per worker
    return root, questions


def _cfg(root: Path, questions: str, name: str, **kw) -> TrainConfig:
    base = {"index": str(root / "index"), "train": questions, "dev": questions, "init_from": str(root / "init_model"),
            "mode": "sequence", "n_docs": 2, "batch_size": 2, "lr": 3e-3, "query_encoder_lr": 3e-3, "warmup_steps": 0,
            "max_steps": 24, "eval_every": 12, "checkpoint_every": 12, "eval_questions": 5, "num_workers": 2,
            "storage_path": str(root / "runs"), "name": name, "max_failures": 0, "torch_threads": 1}
    return load_config(TrainConfig, overrides={**base, **kw})


def _mean_loss(model_dir, root, questions) -> float:
    model = RagModel.from_pretrained(model_dir, device="cpu")
    retriever = Retriever.load(root / "index")
    qs = [q["question"] for q in TOY_QUESTIONS]
    res = retriever.search(model.query_encoder.encode(qs), 2)
    with torch.no_grad():
        out = model.loss(qs, [q["answers"][0] for q in TOY_QUESTIONS], res.hits, res.vectors, mode="sequence")
    retriever.shutdown()
    return float(out.loss)


def test_two_workers_lower_the_loss_write_a_checkpoint_and_resume(setup):
    root, questions = setup
    report = run_training(_cfg(root, questions, "lower", log_retrievals=True))
    m = report["metrics"]
    assert m["step"] == 24 and m["world_size"] == 2 and m["samples"] == 24 * 2 * 2
    assert {"dev_em", "dev_f1", "dev_recall@2", "time_retrieve_s", "time_backward_s"} <= set(m)
    before = _mean_loss(root / "init_model", root, questions)
    after = _mean_loss(report["model"], root, questions)
    assert after < 0.7 * before, (before, after)

    # Retrieval inside training is the Retriever client's: same passages for the first batch.
    logged = m["retrieval_log"][0]
    init = RagModel.from_pretrained(root / "init_model", device="cpu")
    retriever = Retriever.load(root / "index")
    res = retriever.search(init.query_encoder.encode(logged["questions"]), 2)
    assert logged["passage_ids"] == [[h.passage_id for h in hits] for hits in res.hits]
    retriever.shutdown()

    resumed = run_training(_cfg(root, questions, "resumed", resume_from=report["checkpoint"], max_steps=30))
    assert resumed["metrics"]["resumed_from_step"] == 24 and resumed["metrics"]["step"] == 30


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
    assert main(["eval-qa", "--model", init, "--questions", questions]) == 2
    assert "give --index" in capsys.readouterr().err


def registered_checkpoints(run_dir: Path) -> list:
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []


def test_killed_worker_recovers_from_the_last_checkpoint(setup):
    import os
    import signal

    import psutil

    root, questions = setup
    cfg = _cfg(root, questions, "chaos", max_steps=48, checkpoint_every=8, eval_every=1000, max_failures=2,
               eval_questions=0)
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
                # Ray titles actor processes "ray::RayTrainWorker...": kill one train worker.
                workers = [p.pid for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
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
    with pytest.raises(ValueError, match="index: mode 'sequence' retrieves passages"):
        load_config(TrainConfig, overrides={"index": None})
    minilm_cfg = _cfg(root, questions, "mismatch", init_from=None, query_encoder=DEFAULT_ENCODER)
    with pytest.raises(ValueError, match="dimension 384 != index's 32"):
        run_training(minilm_cfg)
    report = run_training(_cfg(root, questions, "closed", mode="closed_book", index=None, max_steps=4,
                               num_workers=1, eval_every=4, checkpoint_every=4))
    assert report["metrics"]["step"] == 4 and "dev_recall@2" not in report["metrics"]


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
    with pytest.raises(ValueError, match="no training question has a gold passage"):
        with_gold_passages(qa_rows(examples[-1:]), toy_corpus)


def test_reader_warm_up_learns_to_read_gold_passages(setup, toy_corpus):
    root, questions = setup
    report = run_training(_cfg(root, questions, "reader", mode="reader", corpus=toy_corpus, num_workers=1,
                               max_steps=16, eval_every=16, checkpoint_every=16))
    m = report["metrics"]
    assert m["step"] == 16 and "dev_recall@2" in m  # evaluated as RAG-Sequence over the index

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

