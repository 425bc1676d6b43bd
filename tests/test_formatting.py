"""process_func and the label mask (DESIGN.md §2.5), shown on hand-built expectations."""

from __future__ import annotations

import pytest

from glmlora.formatting import IGNORE, build_example, process_func, render_mask_text, tokenize_records
from glmlora.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_original):
    return load_tokenizer(tiny_original)


def test_single_turn_targets_are_newline_reply_and_eos(tok):
    rec = {"system": "你是心理咨询助手。", "input": "我睡不着。", "output": "试试睡前放松。"}
    feats = process_func(rec, tok)
    sp, nl = tok.sp, tok.sp.encode("\n")
    prompt = tok.prefix_ids() + [tok.role_id("system")] + nl + sp.encode(rec["system"]) + \
        [tok.role_id("user")] + nl + sp.encode(rec["input"]) + [tok.role_id("assistant")]
    targets = nl + sp.encode(rec["output"]) + [tok.eos_token_id]
    assert feats["input_ids"] == prompt + targets
    assert feats["labels"] == [IGNORE] * len(prompt) + targets
    assert feats["length"] == len(prompt + targets) and not feats["truncated"]


def test_empty_system_means_no_system_message(tok):
    feats = process_func({"system": "", "input": "hi", "output": "hello"}, tok)
    assert tok.role_id("system") not in feats["input_ids"]


def test_multi_turn_trains_every_reply_and_the_next_role_token(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    ex = build_example(msgs, tok)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    nl, sp = tok.sp.encode("\n"), tok.sp.encode
    assert trained == nl + sp("a1") + [tok.role_id("user")] + nl + sp("a2") + [tok.eos_token_id]
    assert all(lab == IGNORE for t, lab in zip(ex["input_ids"], ex["labels"]) if t == tok.role_id("assistant"))


def test_truncation_is_reported_and_reply_less_examples_are_dropped(tok):
    long = {"input": "你好" * 200, "output": "嗯。"}
    short = {"input": "hi", "output": "hello there"}
    feats = process_func(long, tok, max_length=32)
    assert feats["truncated"] and len(feats["input_ids"]) == 32 == len(feats["labels"])
    ds, report = tokenize_records([long, short], tok, max_length=32)
    assert (report.records, report.kept, report.truncated, report.dropped_no_target) == (2, 1, 1, 1)
    assert len(ds) == 1 and "1 dropped" in str(report)


def test_mask_rendering_marks_only_the_reply(tok):
    ex = process_func({"input": "question", "output": "answer"}, tok)
    text = render_mask_text(ex["input_ids"], ex["labels"], tok)
    assert "⟦" in text and "answer" in text.split("⟦", 1)[1] and "question" not in text.split("⟦", 1)[1]
    assert text.rstrip().endswith("⟦</s>⟧")


def test_text_built_prompt_of_the_original_tutorial_is_not_the_chat_format(tok):
    """Pitfall 1: '<|user|>' written as text becomes ordinary pieces, not the role token."""
    as_text = tok.encode("<|user|>\n我睡不着<|assistant|>\n", add_special_tokens=False)
    assert tok.role_id("user") not in as_text and tok.role_id("assistant") not in as_text
    assert len(as_text) > len(tok.build_message("user", "我睡不着")) + 1
