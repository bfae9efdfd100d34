"""SQuAD EM/F1, checked against hand-computed values."""

import pytest

from rag_ray.metrics import exact_match, f1_score, normalize_answer, squad_scores


def test_normalisation_strips_case_punctuation_articles_space():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_exact_match_any_gold():
    assert exact_match("the United States", ["USA", "United States"]) == 1.0
    assert exact_match("States", "United States") == 0.0


def test_f1_partial_overlap():
    # pred tokens: {united, states, army}, gold: {united, states}: P=2/3, R=1 -> F1=0.8
    assert f1_score("the United States army", "United States") == pytest.approx(0.8)
    assert f1_score("nothing", ["something else", "nothing at all"]) == pytest.approx(0.5)  # P=1, R=1/3
    assert f1_score("", "") == 1.0 and f1_score("a", "b c") == 0.0


def test_squad_scores_and_errors():
    assert squad_scores(["Paris", "x"], [["paris"], ["y"]]) == {"em": 50.0, "f1": 50.0}
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one gold"):
        exact_match("a", [])


def test_bootstrap_interval_matches_the_normal_approximation_and_is_reproducible():
    import numpy as np

    from rag_ray.metrics import bootstrap_ci95

    scores = (np.random.default_rng(1).random(1000) < 0.3).astype(float)
    lo, hi = bootstrap_ci95(scores)
    mean, half = scores.mean(), 1.96 * np.sqrt(scores.mean() * (1 - scores.mean()) / len(scores))
    assert lo < mean < hi
    assert abs((hi - lo) / 2 - half) < 0.15 * half
    assert bootstrap_ci95(scores) == (lo, hi)
    lo4, hi4 = bootstrap_ci95(np.tile(scores, 4))  # 4x the questions: about half the width
    assert 0.4 < (hi4 - lo4) / (hi - lo) < 0.6


def test_paired_interval_separates_what_two_overlapping_intervals_cannot():
    """Two systems on the same 1,000 questions: b answers every question a answers except 30. Their
    own intervals overlap (not separated by that rule), but the paired interval of a - b is about
    [0.02, 0.04]: every difference points the same way."""
    import numpy as np

    from rag_ray.metrics import bootstrap_ci95, paired_bootstrap_ci95

    rng = np.random.default_rng(1)
    a = (rng.random(1000) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:30]] = 0.0
    (alo, _), (blo, bhi) = bootstrap_ci95(a), bootstrap_ci95(b)
    assert blo < alo < bhi  # the separate intervals overlap
    lo, hi = paired_bootstrap_ci95(a, b)
    assert 0 < lo <= 0.03 <= hi < 0.045
    assert paired_bootstrap_ci95(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same questions on both sides, got 1000 and 999"):
        paired_bootstrap_ci95(a, b[:-1])
