"""ROUGE-1/2/L and BLEU-4 as the official ChatGLM3 fine-tuning demo reports them (lesson 07).

Chinese text is segmented with jieba, English into lower-cased words; scores come from ``rouge_chinese``
and NLTK's sentence BLEU with smoothing method 3 (as in the official demo), times 100.
"""

from __future__ import annotations

import re
from statistics import mean
from typing import Sequence

_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def segment(text: str) -> list[str]:
    """Words: jieba for text with Chinese characters, lower-cased word/punctuation tokens otherwise."""
    if _CJK.search(text):
        import jieba

        jieba.setLogLevel(60)  # no "Building prefix dict" chatter in every notebook
        return [w for w in jieba.lcut(text) if w.strip()]
    return _WORD.findall(text.lower())


def scores(hypothesis: str, reference: str) -> dict[str, float]:
    """The four metrics (0–100) for one generated answer against its reference answer."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hyp, ref = segment(hypothesis), segment(reference)
    if not hyp or not ref:
        return dict.fromkeys(METRICS, 0.0)  # an empty answer scores nothing (the library would raise)
    rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    out = {k: 100 * rouge[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}
    out["bleu-4"] = 100 * sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)
    return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The mean of each metric over pairs (the official demo averages sentence scores)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers for {len(references)} references")
    per = [scores(h, r) for h, r in zip(hypotheses, references)]
    return {k: mean(p[k] for p in per) if per else 0.0 for k in METRICS}
