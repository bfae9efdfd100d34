"""Index build -> persist -> reload -> search on a real local Ray with the real MiniLM encoder."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from conftest import TOY_QUESTIONS, start_local_ray
from rag_ray.cli import main
from rag_ray.config import IndexConfig, load_config
from rag_ray.errors import RagRayError
from rag_ray.indexing import build_index
from rag_ray.manifest import resolve_index
from rag_ray.retriever import Retriever


def _build(corpus, out, shards, **kw):
    cfg = load_config(IndexConfig, overrides={"corpus": [corpus], "out": str(out), "shards": shards, "overwrite": True, **kw})
    return build_index(cfg)


@pytest.fixture(scope="module")
def indexes(ray_local, toy_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    m3 = _build(toy_corpus, root / "three", 3)
    m1 = _build(toy_corpus, root / "one", 1)
    # the version directories the builds wrote (<root>/vNNNN, named by <root>/current)
    return {"three": (resolve_index(root / "three"), m3), "one": (resolve_index(root / "one"), m1)}


def _top(retriever, encoder, k=4):
    res = retriever.search(encoder.encode([q["question"] for q in TOY_QUESTIONS]), k)
    return res, [[h.passage_id for h in hits] for hits in res.hits], np.array([[h.score for h in hits] for hits in res.hits])


def test_build_writes_manifest_with_checksums(indexes):
    path, manifest = indexes["three"]
    assert manifest.passage_count == 9 and manifest.shard_count == 3
    assert sum(s.passages for s in manifest.shards) == 9
    data = json.loads((path / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["encoder"]["dim"] == 384 and data["encoder"]["pooling"] == "mean"
    for shard in manifest.shards:
        assert set(shard.files) == {"index.faiss", "vectors.npy", "passages.parquet"}
        assert all(len(f["sha256"]) == 64 for f in shard.files.values())
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temp dirs left behind


def test_search_finds_the_right_documents_and_returns_vectors(indexes, encoder):
    retriever = Retriever.load(indexes["three"][0], query_encoder=encoder)
    res, ids, scores = _top(retriever, encoder)
    assert [hits[0].doc_id for hits in res.hits] == [q["doc_id"] for q in TOY_QUESTIONS]
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # ranked
    assert res.vectors.shape == (len(TOY_QUESTIONS), 4, 384)
    # The stored vector really is the passage's: q·d recomputed from it equals the score.
    q = encoder.encode([TOY_QUESTIONS[0]["question"]])[0]
    np.testing.assert_allclose(res.vectors[0] @ q, scores[0], atol=2e-3)
    retriever.shutdown()


def test_one_and_three_shards_give_identical_topk(indexes, encoder):
    r1 = Retriever.load(indexes["one"][0], query_encoder=encoder)
    r3 = Retriever.load(indexes["three"][0], query_encoder=encoder)
    _, ids1, s1 = _top(r1, encoder, k=9)
    _, ids3, s3 = _top(r3, encoder, k=9)
    assert ids1 == ids3
    np.testing.assert_allclose(s1, s3, atol=1e-5)
    r1.shutdown(), r3.shutdown()


def test_flat_shard_merge_equals_one_faiss_index(indexes, encoder):
    path, manifest = indexes["three"]
    vectors, ids = [], []
    import pyarrow.parquet as pq

    for shard in manifest.shards:
        index = faiss.read_index(str(path / shard.directory / "index.faiss"))
        vectors.append(index.reconstruct_n(0, index.ntotal))
        ids += pq.read_table(path / shard.directory / "passages.parquet").column("passage_id").to_pylist()
    single = faiss.IndexFlatIP(384)
    single.add(np.concatenate(vectors))
    q = encoder.encode([t["question"] for t in TOY_QUESTIONS])
    ref_scores, ref_rows = single.search(q, 6)
    retriever = Retriever.load(path, query_encoder=encoder)
    res = retriever.search(q, 6)
    assert [[h.passage_id for h in hits] for hits in res.hits] == [[ids[r] for r in row] for row in ref_rows]
    np.testing.assert_allclose([[h.score for h in hits] for hits in res.hits], ref_scores, rtol=1e-6)
    retriever.shutdown()


def test_reload_in_a_fresh_ray_session_gives_the_same_results(indexes, encoder, ray_local):
    retriever = Retriever.load(indexes["three"][0], query_encoder=encoder)
    _, ids_before, s_before = _top(retriever, encoder)
    ray_local.shutdown()
    start_local_ray()
    retriever = Retriever.load(indexes["three"][0], query_encoder=encoder)
    _, ids_after, s_after = _top(retriever, encoder)
    assert ids_before == ids_after
    np.testing.assert_array_equal(s_before, s_after)
    retriever.shutdown()


def test_corrupted_missing_and_mismatched_indexes_fail_at_load(indexes, encoder, tmp_path):
    from rag_ray.encoders import Encoder

    copy = tmp_path / "copy"
    shutil.copytree(indexes["three"][0], copy)
    target = copy / "shard-00001" / "passages.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"index file corrupted: .*shard-00001/passages.parquet"):
        Retriever.load(copy, query_encoder=encoder)
    (copy / "shard-00002" / "index.faiss").unlink()
    with pytest.raises(ValueError, match=r"index file (missing|corrupted)"):
        Retriever.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json is corrupted"):
        Retriever.load(copy)
    cls_encoder = Encoder(encoder.model, encoder.tokenizer, name="cls-variant", pooling="cls", normalize=True)
    with pytest.raises(ValueError, match=r"does not match the index .*pooling 'cls'"):
        Retriever.load(indexes["three"][0], query_encoder=cls_encoder)


def test_tiny_encoder_of_other_dim_is_refused(indexes, tmp_path):
    from transformers import BertConfig, BertModel

    from rag_ray.encoders import Encoder

    tiny = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    enc = Encoder(tiny, None, name="tiny-bert", pooling="mean", normalize=True)
    with pytest.raises(ValueError, match=r"dimension 32 != index's 384"):
        Retriever.load(indexes["one"][0], query_encoder=enc)


def test_malformed_corpus_fails_with_file_and_line_or_is_skipped(ray_local, toy_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(toy_corpus).read() + '{"id": "x", "title": "no text here"}\n')
    rc = main(["index", "--corpus", str(bad), "--out", str(tmp_path / "bad_idx"), "--shards", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl, line 8, field 'text': missing required field" in err
    assert "Traceback" not in err and not (tmp_path / "bad_idx").exists()
    rc = main(["index", "--corpus", str(bad), "--out", str(tmp_path / "skip_idx"), "--shards", "2", "--on-error", "skip", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["skipped_rows"] == 1 and report["passages"] == 9


def test_cli_index_search_eval_json(ray_local, toy_corpus, toy_questions, tmp_path, capsys):
    out = tmp_path / "cli_idx"
    assert main(["index", "--corpus", toy_corpus, "--out", str(out), "--shards", "2", "--bf16", "--json"]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["passages"] == 9 and built["shards"] == 2
    # building again adds a version and moves `current`; the first version stays intact
    first = resolve_index(out)
    assert first.name == "v0001" and (out / "current").read_text().strip() == "v0001"
    assert main(["index", "--corpus", toy_corpus, "--out", str(out), "--shards", "2"]) == 0
    capsys.readouterr()
    assert resolve_index(out).name == "v0002" and (first / "manifest.json").is_file()
    (tmp_path / "not_an_index").mkdir()
    (tmp_path / "not_an_index" / "notes.txt").write_text("mine")
    assert main(["index", "--corpus", toy_corpus, "--out", str(tmp_path / "not_an_index")]) == 2
    assert "is not a rag_ray index root" in capsys.readouterr().err
    assert (tmp_path / "not_an_index" / "notes.txt").read_text() == "mine"
    assert main(["search", "--index", str(out), "-k", "2", "--json", "Who created Python?"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["hits"]
    assert len(hits) == 2 and hits[0]["doc_id"] == "python"
    assert main(["eval-retrieval", "--index", str(out), "--questions", toy_questions, "--json", "--hybrid"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["questions"] == 5
    assert report["dense"]["recall@1"] == 1.0 and report["dense"]["recall@5"] == 1.0
    assert 0.0 <= report["bm25"]["recall@1"] <= report["bm25"]["recall@5"] <= 1.0
    assert report["dense"]["answer_recall@5"] > 0
    # --hybrid: a third table, and each gold doc found in the hybrid top-5 credited to one source
    found = report["hybrid_sources"]["@5"]
    assert found["found"] == round(5 * report["hybrid"]["recall@5"]) > 0
    assert sum(found[s] for s in ("dense", "lexical", "both")) == pytest.approx(1.0)


def test_embedding_pool_is_sized_from_the_cluster_unless_the_config_says():
    from rag_ray.indexing import embedding_resources

    auto = load_config(IndexConfig, overrides={"corpus": ["x"]})
    assert embedding_resources(auto, {"CPU": 2.0}) == (2, 1.0, 0.0, 1)  # one 1-thread actor per CPU
    assert embedding_resources(auto, {"CPU": 32.0, "GPU": 4.0}) == (4, 1.0, 1.0, 1)  # one actor per GPU
    fixed = load_config(IndexConfig, overrides={"corpus": ["x"], "embedders": 1, "embedder_cpus": 2,
                                                "torch_threads": 2})
    assert embedding_resources(fixed, {"CPU": 16.0}) == (1, 2.0, 0.0, 2)


def test_embedding_precision_auto_is_bf16_exactly_where_the_cpu_has_it():
    import sys

    import torch

    from rag_ray.encoders import bf16_is_native, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_is_native(cpu) else "fp32")
    if sys.platform == "linux":  # an independent reading of the same hardware fact
        flags = open("/proc/cpuinfo").read().split()
        assert bf16_is_native(cpu) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    with pytest.raises(RagRayError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp8", cpu)
