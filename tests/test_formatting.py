"""process_func and the label mask (docs/design.md §2.5), shown on hand-built expectations."""

from __future__ import annotations

import pytest

from glmlora.data import load_records, sample_data_path
from glmlora.formatting import (IGNORE, build_example, process_func, record_windows, render_mask_text,
                                tokenize_records)
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


def test_process_func_cuts_at_max_length_like_the_original(tok):
    long = {"input": "你好" * 200, "output": "嗯。"}
    feats = process_func(long, tok, max_length=32)
    assert feats["truncated"] and len(feats["input_ids"]) == 32 == len(feats["labels"])
    assert all(label == IGNORE for label in feats["labels"])  # the reply was cut off: why windows exist


def dialogue(i: int, turns: int) -> dict:
    """A synthetic multi-turn record: a system message and ``turns`` exchanges of about 60 tokens each."""
    msgs = [{"role": "system", "content": "You are a calm, careful counsellor."}]
    for k in range(turns):
        msgs += [{"role": "user", "content": f"Dialogue {i}, turn {k}: I could not sleep again and I feel tense."},
                 {"role": "assistant", "content": f"Reply {k} of {i}: that sounds exhausting. What went through "
                                                  f"your mind while you were lying awake tonight?"}]
    return {"messages": msgs}


def expected_window(tok, messages, window, n_exchanges):
    """Ids and labels of a window, built from docs/design.md §2.5 on the messages it holds: the context exchanges
    untrained, the trained replies and the token after each as targets, ending on that token."""
    system, exchanges = messages[:1], [messages[1 + 2 * k: 3 + 2 * k] for k in range(n_exchanges)]
    ids, owner = tok.prefix_ids(), [False, False]
    for m in system + [m for k in window.context for m in exchanges[k]]:
        part = tok.build_message(m["role"], m["content"])
        ids, owner = ids + part, owner + [False] * len(part)
    for k in window.trained:
        for m in exchanges[k]:
            part = tok.build_message(m["role"], m["content"])
            ids, owner = ids + part, owner + [m["role"] == "assistant"] * len(part)
    last = window.trained[-1]
    ids.append(tok.eos_token_id if last == n_exchanges - 1 else tok.role_id("user"))
    owner.append(False)
    return ids, [IGNORE] + [t if owner[i - 1] else IGNORE for i, t in enumerate(ids) if i > 0]


def test_every_reply_token_of_long_dialogues_is_trained_once(tok):
    """The issue's CPU test: plain truncation would lose >= 40 % of the reply tokens; windows train all of them,
    each exchange in exactly one window, at exactly the positions the label rule gives."""
    records, max_length = [dialogue(i, turns=6 + i % 5) for i in range(12)], 256
    truncated = sum(sum(x != IGNORE for x in process_func(r, tok, max_length)["labels"]) for r in records)
    ds, report = tokenize_records(records, tok, max_length)
    assert truncated <= 0.6 * report.reply_tokens
    assert report.trained_tokens == report.reply_tokens and report.truncated_turns == 0
    assert report.windows == len(ds) > len(records) == report.split_records
    for i, r in enumerate(records):
        n = len(r["messages"]) // 2
        windows = record_windows(r, tok, max_length)
        assert [k for w in windows for k in w.trained] == list(range(n))  # each exchange once, in order
        for w in windows:
            assert len(w.input_ids) <= max_length
            assert (w.input_ids, w.labels) == expected_window(tok, r["messages"], w, n)
        assert any(len(w.context) > 0 for w in windows[1:])  # later windows keep history before their replies
        rows = [j for j, rec in enumerate(ds["record"]) if rec == i]
        assert [ds[j]["input_ids"] for j in rows] == [w.input_ids for w in windows]


def test_records_that_fit_give_exactly_process_funcs_features(tok):
    records = load_records(sample_data_path())
    ds, report = tokenize_records(records, tok, 1024)
    assert report.windows == len(records) and report.coverage == 1.0
    for i in range(0, len(records), 7):
        feats = process_func(records[i], tok, 1024)
        assert (ds[i]["input_ids"], ds[i]["labels"], ds[i]["length"]) == \
            (feats["input_ids"], feats["labels"], feats["length"])


def test_a_turn_longer_than_max_length_is_shortened_and_counted_never_dropped(tok):
    huge = {"system": "S", "input": "今天很难过。" * 40_000, "output": "我在。"}  # 240,000 characters
    long_reply = {"input": "hi", "output": "long answer " * 200}
    short = {"input": "hi", "output": "hello there"}
    ds, report = tokenize_records([huge, long_reply, short], tok, max_length=64)
    assert (report.records, report.windows, report.truncated_turns) == (3, 3, 2)
    assert report.trained_tokens < report.reply_tokens
    w = record_windows(huge, tok, 64)[0]
    assert w.truncated and len(w.input_ids) == 64
    reply = tok.build_message("assistant", huge["output"])
    assert w.input_ids[-len(reply) - 1:-1] == reply and w.labels[-1] == tok.eos_token_id  # the reply kept whole
    assert tok.role_id("user") in w.input_ids and tok.role_id("system") in w.input_ids
    cut = record_windows(long_reply, tok, 64)[0]
    assert len(cut.input_ids) == 64 and cut.targets >= 32  # at least half the window is reply
    assert "2 turns truncated" in str(report) and "\n" not in str(report)


def test_a_system_message_longer_than_the_window_is_cut_not_the_reply(tok):
    rec = {"system": "rules " * 300, "input": "hi", "output": "hello"}
    w = record_windows(rec, tok, 64)[0]
    assert w.truncated and len(w.input_ids) <= 64
    assert [t for t, lab in zip(w.input_ids, w.labels) if lab != IGNORE] == \
        tok.build_message("assistant", "hello")[1:] + [tok.eos_token_id]


def test_the_report_is_one_line_with_the_coverage(tok):
    ds, report = tokenize_records([dialogue(0, 8), {"input": "hi", "output": "hello"}], tok, max_length=200)
    line = str(report)
    assert line.startswith("2 examples in -> ") and "\n" not in line
    assert f"reply tokens trained {report.trained_tokens:,} / {report.reply_tokens:,} (100.0 %)" in line
    assert "0 turns truncated" in line and f"{report.windows} windows (1 long dialogues split)" in line
    assert (report.kept, report.target_tokens, report.truncated, report.dropped_no_target) == \
        (report.windows, report.trained_tokens, 0, 0)
    with pytest.raises(ValueError, match="too small"):
        tokenize_records([dialogue(0, 1)], tok, max_length=8)


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
