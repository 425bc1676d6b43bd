"""Lesson 07's claims: after lesson 05's training the held-out loss is lower; the helpers behave."""

from __future__ import annotations

import pytest

from glmlora.data import load_records
from glmlora.evaluation import (answers, crisis_indices, heldout_loss, prompts_and_references, referral_rate)
from glmlora.generate import GenerationSettings

from conftest import private_workdir


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Lesson 05 with the tiny profile's defaults, then lesson 06's reload (unmerged)."""
    from glmlora.pipeline import load_finetuned
    from glmlora.profiles import select_profile

    with private_workdir(tmp_path_factory.mktemp("work")):
        profile = select_profile("tiny")
        before = live_models()
        model, tok = load_finetuned(profile, merge=False)  # trains the adapter first: none exists yet
        assert live_models() == before + 1  # the training run's model is gone, only the reloaded one lives
        yield model, tok, load_records(profile.data_dir / "val.jsonl"), profile


def live_models() -> int:
    import gc

    from transformers import GlmForCausalLM

    gc.collect()
    return sum(type(o) is GlmForCausalLM for o in gc.get_objects())  # type(): no attribute access on odd objects


def test_finetuned_heldout_loss_is_lower_than_the_base_model(finetuned):
    from glmlora.evaluation import adapter_off

    model, tok, val, profile = finetuned
    tuned = heldout_loss(model, tok, val, profile.max_length, progress=False)
    with adapter_off(model):
        base = heldout_loss(model, tok, val, profile.max_length, progress=False)
    assert tuned["tokens"] == base["tokens"] > 1000
    assert tuned["loss"] < base["loss"] - 0.3
    assert tuned["perplexity"] < base["perplexity"]


def test_base_answers_differ_from_finetuned_answers(finetuned):
    model, tok, val, _ = finetuned
    prompts, refs = prompts_and_references(val[:4])
    settings = GenerationSettings(do_sample=False, max_new_tokens=16)
    assert answers(model, tok, prompts, settings, base=True) != answers(model, tok, prompts, settings)
    assert len(refs) == 4 and all(refs)


def test_crisis_selection_and_referral_rate():
    refs = ["请拨打希望24热线 400-161-9995，并联系专业人士。", "Try a walk.", "Call 988 or a professional now."]
    assert crisis_indices(refs) == [0, 2]
    assert referral_rate(["找专业的心理咨询师聊聊", "ok", "Please see a doctor", "no"]) == 0.5
