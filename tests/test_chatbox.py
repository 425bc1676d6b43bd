"""The chat box: session logic and the widgets' callbacks, without a browser."""

from __future__ import annotations

import pytest

from glmlora.chatbox import DISCLAIMER, ChatBox, ChatSession, render_transcript
from glmlora.generate import GenerationSettings

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=64)


def test_session_streams_and_records_history(memorised):
    model, tok, records, *_ = memorised
    rec = next(r for r in records if r.get("system"))
    session = ChatSession(model, tok, system=rec["system"], settings=GREEDY)
    reply = "".join(session.send(rec["input"]))
    assert reply == rec["output"].strip()
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    "".join(session.send("谢谢"))
    assert len(session.exchanges) == 2 and session.exchanges[0] == (rec["input"], reply)
    session.clear()
    assert session.history == [] and session.exchanges == []


def test_empty_message_is_refused(memorised):
    model, tok, *_ = memorised
    with pytest.raises(ValueError, match="empty message"):
        list(ChatSession(model, tok).send("   "))


def test_chat_box_buttons(memorised):
    model, tok, records, *_ = memorised
    box = ChatBox(ChatSession(model, tok, settings=GREEDY))
    rec = next(r for r in records if not r.get("system"))
    box.input.value = rec["input"]
    box.send_button.click()
    assert box.input.value == "" and not box.send_button.disabled
    assert rec["output"].strip()[:10] in box.transcript.value
    assert len(box.session.history) == 2
    box.send_button.click()  # nothing typed: a hint, no new exchange
    assert "Type a message" in box.status.value and len(box.session.history) == 2
    box.clear_button.click()
    assert box.session.history == [] and "Say hello" in box.transcript.value
    assert "not a therapist" in DISCLAIMER and "12356" in DISCLAIMER


def test_transcript_escapes_html():
    html = render_transcript([("<b>hi</b>", "ok")], pending=("next", ""))
    assert "&lt;b&gt;hi&lt;/b&gt;" in html and "…" in html


def test_chat_box_warns_that_the_first_gpu_reply_compiles(memorised):
    import torch

    _, tok, *_ = memorised

    class OnCuda:  # the status logic only looks at the device and at compiled steps kept on the model
        device = torch.device("cuda")

    seen = []

    def stream(*_):
        seen.append(box.status.value)
        yield "好的"

    model = OnCuda()
    box = ChatBox(ChatSession(model, tok, stream=stream))
    box.input.value = "你好"
    assert box.send() == "好的" and "compiles the decode step" in seen[-1] and box.status.value == ""
    model._glmlora_decode_steps = {"reduce-overhead": object()}  # compiled now
    box.input.value = "再问一次"
    box.send()
    assert seen[-1] == "<i>thinking…</i>"


def test_memorised_questions_are_listed_under_the_box(memorised):
    model, tok, records, *_ = memorised
    box = ChatBox(ChatSession(model, tok, settings=GREEDY), memorised=["<q1>", "你好"])
    hint = box.widget.children[-1].value
    assert "&lt;q1&gt;" in hint and "你好" in hint and "Clear" in hint
    assert ChatBox(ChatSession(model, tok)).widget.children[-1].value == ""
