"""IndexShard and the top-k merge with hand-made vectors, without Ray."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rag_ray.shard import IndexShard, merge_topk


def _shard(vectors, ids, index_type="flat", **kw) -> IndexShard:
    shard = IndexShard(vectors.shape[1], index_type, **kw)
    shard.add(ids, [i.split("::")[0] for i in ids], ["t"] * len(ids), [f"text {i}" for i in ids], vectors)
    shard.finalize()
    return shard


def test_merge_equals_single_flat_index_and_drops_padding():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    ids = [f"d{i}::0" for i in range(50)]
    parts = [[i for i in range(50) if i % 3 == s] for s in range(3)]
    shards = [_shard(vecs[p], [ids[i] for i in p]) for p in parts]
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    results = [s.search(queries, 10) for s in shards]
    scores, shard_no, rows = merge_topk([r[0] for r in results], [r[1] for r in results], 10)
    single = faiss.IndexFlatIP(8)
    single.add(vecs)
    ref_scores, ref_rows = single.search(queries, 10)
    merged_ids = [[shards[s].passage_ids[r] for s, r in zip(srow, rrow)] for srow, rrow in zip(shard_no, rows)]
    assert merged_ids == [[ids[r] for r in row] for row in ref_rows]
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    # k larger than the corpus: every slot that FAISS pads with -1 is marked empty, never a hit.
    small = [_shard(vecs[:2], ids[:2]), _shard(vecs[2:3], ids[2:3])]
    res = [s.search(queries, 5) for s in small]
    scores, shard_no, rows = merge_topk([r[0] for r in res], [r[1] for r in res], 5)
    assert scores.shape == (4, 3) and (shard_no >= 0).all()


def test_rows_are_sorted_so_builds_are_deterministic(tmp_path):
    vecs = np.eye(8, dtype=np.float32)
    ids = [f"d{i}::0" for i in range(8)]
    a = IndexShard(8)
    for part in (slice(4, 8), slice(0, 4)):  # rows arrive in the "wrong" order
        a.add(ids[part], [i.split("::")[0] for i in ids[part]], ["t"] * 4, [f"text {i}" for i in ids[part]], vecs[part])
    a.finalize()
    b = _shard(vecs, ids)
    assert a.passage_ids == b.passage_ids == sorted(ids)
    fa, fb = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    assert fa == fb  # byte-identical files whatever the arrival order


def test_duplicate_passage_ids_are_rejected():
    shard = IndexShard(8)
    shard.add(["x::0", "x::0"], ["x", "x"], ["t", "t"], ["a", "b"], np.eye(8, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="duplicate passage_id 'x::0'"):
        shard.finalize()


def test_wrong_dimensions_are_rejected():
    shard = _shard(np.eye(8, dtype=np.float32), [f"d{i}::0" for i in range(8)])
    with pytest.raises(ValueError, match=r"shape \(batch, 8\)"):
        shard.search(np.zeros((2, 7), np.float32), 3)
    with pytest.raises(ValueError, match=r"expected vectors of shape \(1, 8\)"):
        IndexShard(8).add(["a"], ["a"], ["t"], ["x"], np.zeros((1, 4), np.float32))


def test_save_load_roundtrip_and_corruption(tmp_path):
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(30, 8)).astype(np.float32)
    ids = [f"d{i}::0" for i in range(30)]
    shard = _shard(vecs, ids)
    files = shard.save(tmp_path / "s")
    loaded = IndexShard.load(tmp_path / "s", 8, "flat", files=files)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    for got, want in zip(loaded.search(q, 5), shard.search(q, 5)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(loaded.fetch([0, 5])["vectors"], vecs[[ids.index(loaded.passage_ids[0]), ids.index(loaded.passage_ids[5])]], atol=1e-2)
    with open(tmp_path / "s" / "vectors.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match=r"index file corrupted: .*vectors.npy"):
        IndexShard.load(tmp_path / "s", 8, "flat", files=files)
    (tmp_path / "s" / "index.faiss").unlink()
    with pytest.raises(ValueError, match=r"index file missing: .*index.faiss"):
        IndexShard.load(tmp_path / "s", 8, "flat", files=files)


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_approximate_indexes_find_the_exact_neighbours_mostly(index_type):
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(4000, 32)).astype(np.float32)
    ids = [f"d{i:05d}::0" for i in range(4000)]
    shard = _shard(vecs, ids, index_type, nprobe=32)
    q = vecs[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    _, rows = shard.search(q, 1)
    found = [shard.passage_ids[r] for r in rows[:, 0]]
    assert sum(f == ids[i] for i, f in enumerate(found)) >= 45


def test_ivfpq_refuses_too_small_a_shard():
    with pytest.raises(ValueError, match="ivfpq needs at least"):
        _shard(np.eye(8, dtype=np.float32), [f"d{i}::0" for i in range(8)], "ivfpq")


def _clustered(n, dim, seed, clusters=20, noise=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    v = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_streams_in_chunks_and_refines_with_stored_vectors(tmp_path):
    """Rows arrive in many batches and wait on disk (in the given spill directory, which is empty
    again after finalize); re-ranking PQ candidates by exact q·d over the stored vectors lifts
    recall@10 against exact search."""
    vecs = _clustered(4000, 32, seed=3)
    queries = _clustered(50, 32, seed=4)
    ids = [f"d{i:05d}::0" for i in range(len(vecs))]
    spill = tmp_path / "spill"
    spill.mkdir()
    shard = IndexShard(32, "ivfpq", ivf_nlist=16, pq_m=4, nprobe=16, refine=1, spill_dir=str(spill))
    for start in range(0, len(vecs), 300):
        part = slice(start, start + 300)
        shard.add(ids[part], ids[part], [""] * len(ids[part]), ["x"] * len(ids[part]), vecs[part])
    assert any(spill.iterdir())  # rows wait on disk, not in memory
    assert shard.finalize() == len(vecs)
    exact = faiss.IndexFlatIP(32)
    exact.add(vecs)
    _, truth = exact.search(queries, 10)

    def recall() -> float:
        _, rows = shard.search(queries, 10)
        found = [{shard.passage_ids[r] for r in row} for row in rows]
        return float(np.mean([len(f & {ids[t] for t in row}) / 10 for f, row in zip(found, truth)]))

    plain = recall()
    shard.tune(refine=8)
    refined = recall()
    assert refined >= plain + 0.3 and refined >= 0.85, (plain, refined)
    shard.tune(nprobe=1)  # a live shard trades recall for speed without a rebuild
    assert recall() < refined
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        shard.tune(nprobe=0)
    files = shard.save(tmp_path / "saved")
    assert not any(p for p in spill.rglob("*") if p.is_file())  # spill and scratch files are gone
    loaded = IndexShard.load(tmp_path / "saved", 32, "ivfpq", files=files, nprobe=16, refine=8)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], IndexShard.load(
        tmp_path / "saved", 32, "ivfpq", nprobe=16, refine=8).search(queries, 10)[1])


def test_search_payload_is_search_plus_fetch_and_can_skip_vectors():
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    shard = _shard(vecs, [f"d{i:03d}::0" for i in range(40)])
    q = rng.normal(size=(3, 8)).astype(np.float32)
    scores, rows, payload = shard.search_payload(q, 5)
    ref_scores, ref_rows = shard.search(q, 5)
    np.testing.assert_array_equal(rows, ref_rows)
    assert payload["rows"] == sorted(set(rows.ravel().tolist()))
    fetched = shard.fetch(payload["rows"])
    assert payload["passage_id"] == fetched["passage_id"]
    np.testing.assert_array_equal(payload["vectors"], fetched["vectors"])
    assert shard.search_payload(q, 5, vectors=False)[2]["vectors"] is None


def test_lexical_search_ranks_a_rare_exact_term_first_and_scores_it_by_q_dot_d(tmp_path):
    """BM25 over "title text" puts the one passage holding the question's rare term first and
    leaves out passages that share no term; hybrid_search gives the q·d of the BM25 hits from the
    vectors the index holds, and a loaded shard rebuilds the same lexical index from its passages."""
    rng = np.random.default_rng(6)
    vecs = rng.normal(size=(30, 8)).astype(np.float32)
    ids = [f"d{i:03d}::0" for i in range(30)]
    texts = [f"ordinary passage about rivers and hills {i}" for i in range(30)]
    texts[17] = "the zanzibarite quarry lies under the hills"
    shard = IndexShard(8)
    shard.add(ids, [i[:4] for i in ids], ["t"] * 30, texts, vecs)
    shard.finalize()
    questions = ["Where is zanzibarite mined?", "Who won the cup final?"]
    scores, rows = shard.lexical_search(questions, 5)
    target = shard.passage_ids.index(ids[17])
    assert rows[0, 0] == target and scores[0, 0] > 0 and (rows[0, 1:] == -1).all()
    assert (rows[1] == -1).all()  # no shared term: no lexical candidate at all
    q = rng.normal(size=(2, 8)).astype(np.float32)
    d_scores, d_rows, _, lex_rows, lex_dots = shard.hybrid_search(q, questions, 3, 5)
    np.testing.assert_array_equal(d_rows, shard.search(q, 3)[1])
    assert lex_rows[0, 0] == target
    np.testing.assert_allclose(lex_dots[0, 0], q[0] @ vecs[17], rtol=1e-5)
    files = shard.save(tmp_path / "s")
    loaded = IndexShard.load(tmp_path / "s", 8, "flat", files=files)
    np.testing.assert_array_equal(loaded.lexical_search(questions, 5)[1], rows)
    with pytest.raises(ValueError, match="got 1 questions for 2 query vectors"):
        shard.hybrid_search(q, questions[:1], 3, 5)


def test_concurrent_adds_keep_each_passage_with_its_own_vector_and_discard_cleans_the_spill(tmp_path):
    """A build actor takes several add() calls at once; every passage must come out of finalize
    with the vector it was added with. discard() deletes what an abandoned build spilled."""
    import threading

    shard = IndexShard(16, spill_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    batches = [(b, rng.normal(size=(50, 16)).astype(np.float32)) for b in range(40)]

    def add(b, v):
        ids = [f"b{b:02d}r{i:02d}" for i in range(len(v))]
        shard.add(ids, ids, ["t"] * len(v), ids, v)

    threads = [threading.Thread(target=add, args=batch) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shard.finalize() == 2000
    expected = {f"b{b:02d}r{i:02d}": v[i] for b, v in batches for i in range(len(v))}
    got = shard.fetch(list(range(2000)))
    for pid, vec in zip(got["passage_id"], got["vectors"]):
        np.testing.assert_allclose(vec, expected[pid], atol=2e-3)  # stored as fp16

    abandoned = IndexShard(16, spill_dir=str(tmp_path / "abandoned"))
    (tmp_path / "abandoned").mkdir()
    abandoned.add(["x"], ["x"], ["t"], ["x"], np.ones((1, 16), np.float32))
    assert any((tmp_path / "abandoned").iterdir())
    abandoned.discard()
    assert not any((tmp_path / "abandoned").iterdir())
