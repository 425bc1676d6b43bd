"""Metrics against values computed by hand."""

from __future__ import annotations

import pytest

from glmlora.metrics import corpus_scores, scores, segment


def test_segmentation_chinese_and_english():
    assert segment("我很开心") == ["我", "很", "开心"]
    assert segment("I feel SAD, really.") == ["i", "feel", "sad", ",", "really", "."]


def test_english_rouge_by_hand():
    # ref "the cat sat", hyp "the cat": P = 1, R = 2/3 -> F1 = 0.8; bigrams P = 1, R = 1/2 -> 2/3; LCS = 2 -> 0.8
    s = scores("the cat", "the cat sat")
    assert s["rouge-1"] == pytest.approx(80.0, abs=1e-4)
    assert s["rouge-2"] == pytest.approx(200 / 3, abs=1e-4)
    assert s["rouge-l"] == pytest.approx(80.0, abs=1e-4)


def test_chinese_rouge_by_hand():
    # 我/很/难过 vs 我/很/开心: unigrams 2 of 3 -> 2/3; bigrams 我很 of {我很, 很开心} -> 1/2
    s = scores("我很难过", "我很开心")
    assert s["rouge-1"] == pytest.approx(200 / 3, abs=1e-4)
    assert s["rouge-2"] == pytest.approx(50.0, abs=1e-4)
    assert s["rouge-l"] == pytest.approx(200 / 3, abs=1e-4)


def test_bleu4_by_hand():
    # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3, same length (no brevity penalty): (1/12) ** (1/4)
    s = scores("the cat sat on a mat", "the cat sat on the mat")
    assert s["bleu-4"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-4)
    assert scores("the cat sat on the mat", "the cat sat on the mat")["bleu-4"] == pytest.approx(100.0)


def test_empty_answer_scores_zero_and_corpus_means():
    assert scores("", "有内容") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    both = corpus_scores(["the cat", ""], ["the cat sat", "x"])
    assert both["rouge-1"] == pytest.approx(40.0, abs=1e-4)
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        corpus_scores(["a", "b"], ["a"])
