"""The chat box: session logic and the widgets' callbacks, without a browser."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from glmlora.chatbox import (DISCLAIMER, SETTLE_SECONDS, STOPPED, STREAMING, TRANSCRIPT_HEIGHT, ChatBox,
                             ChatSession, render_transcript)
from glmlora.generate import GenerationSettings, stream_chat

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


def test_transcript_has_a_fixed_height_and_is_anchored_at_the_newest_message():
    html = render_transcript([("a", "b"), ("c", "d")])
    assert f"height:{TRANSCRIPT_HEIGHT}" in html and "overflow-y:auto" in html
    assert "flex-direction:column-reverse" in html  # the browser keeps such a box scrolled to its end
    assert html.index(">a<") < html.index(">c<")  # oldest first in reading order
    assert html.count('class="glmlora-user"') == 2 and html.count('class="glmlora-reply"') == 2
    assert 'class="glmlora-user"' not in render_transcript([])


class OnCpu:
    """Enough of a model for the box: it only asks where the model is."""
    device = torch.device("cpu")


def fake_box(stream, **kwargs) -> ChatBox:
    return ChatBox(ChatSession(OnCpu(), None, stream=stream), **kwargs)


def test_every_part_carries_its_css_class():
    box = fake_box(lambda *_: iter(()))
    parts = {box.widget: "glmlora-chatbox", box.transcript: "glmlora-transcript", box.input: "glmlora-input",
             box.send_button: "glmlora-send", box.clear_button: "glmlora-clear", box.stop_button: "glmlora-stop",
             box.status: "glmlora-status", box.widget.children[-1]: "glmlora-memorised"}
    for widget, css in parts.items():
        assert css in widget._dom_classes, css


def test_the_input_row_is_locked_while_a_reply_streams():
    seen, statuses = [], []

    def stream(*_):
        for piece in ["one ", "two"]:
            statuses.append(box.status.value)
            seen.append((box.input.disabled, box.send_button.disabled, box.clear_button.disabled,
                         box.stop_button.disabled))
            box.input.value = "typed while streaming"
            box.input._handle_custom_msg({"event": "submit"}, [])  # Enter: ignored while busy
            yield piece

    box = fake_box(stream)
    box.input.value = "hello"
    box.input._handle_custom_msg({"event": "submit"}, [])  # Enter sends, like the Send button
    assert seen == [(True, True, True, False)] * 2
    assert statuses == ["<i>thinking…</i>", STREAMING] and box.status.value == ""
    assert box.session.exchanges == [("hello", "one two")]
    assert (box.input.disabled, box.send_button.disabled, box.clear_button.disabled, box.stop_button.disabled) \
        == (False, False, False, True)


def test_an_error_is_shown_in_the_box_and_the_row_comes_back():
    def stream(*_):
        yield "half a rep"
        raise RuntimeError("CUDA out of memory")

    box = fake_box(stream)
    box.input.value = "hello"
    box.send_button.click()  # a click must not raise: the error goes to the status line
    assert "Error: RuntimeError: CUDA out of memory" in box.status.value
    assert not box.input.disabled and not box.send_button.disabled and box.stop_button.disabled
    assert box.input.value == "hello" and box.session.history == []  # the text is back for another try
    assert "half a rep" not in box.transcript.value
    with pytest.raises(RuntimeError, match="out of memory"):  # code that calls send() sees the error
        box.send()
    assert not box.busy and not box.input.disabled


def test_stop_ends_the_reply_and_keeps_what_was_shown():
    made, closed, at_stop = [], [], []

    def endless(*_):
        try:
            while True:
                made.append(len(made))
                yield f"w{len(made)} "
        finally:
            closed.append(True)

    async def scenario() -> None:
        box.input.value = "talk forever"
        box.send_button.click()  # in a kernel there is a running loop: the reply streams in a task
        assert box._task is not None
        while len(made) < 5:
            await asyncio.sleep(0.001)
        assert box.input.disabled and not box.stop_button.disabled
        at_stop.append(len(made))
        box.stop_button.click()  # handled between two pieces, as the kernel would
        await box._task

    box = fake_box(endless)
    asyncio.run(scenario())
    assert closed and len(made) <= at_stop[0] + 1  # at most the piece under way when Stop came
    (question, partial), = box.session.exchanges
    assert question == "talk forever" and partial == "".join(f"w{i + 1} " for i in range(len(made)))
    assert box.status.value == STOPPED and not box.busy
    assert not box.input.disabled and not box.send_button.disabled and box.stop_button.disabled
    assert partial.strip() in box.transcript.value  # what the learner saw is what the model will see


def test_send_waits_for_the_last_keystrokes():
    sent = []

    def stream(model, tokenizer, text, *_):
        sent.append(text)
        yield "ok"

    async def scenario() -> None:
        box.input.value = "Q"  # all the kernel has of the typing when the click arrives
        box.send_button.click()
        await asyncio.sleep(SETTLE_SECONDS / 2)
        box.input.value = "Quick tip to calm down?"  # the rest of the keystrokes, arriving late
        box.input._handle_custom_msg({"event": "submit"}, [])  # Enter pressed as well: still one message
        await box._task

    box = fake_box(stream)
    asyncio.run(scenario())
    assert sent == ["Quick tip to calm down?"] and box.session.exchanges == [("Quick tip to calm down?", "ok")]


def test_closing_a_stream_stops_the_generate_thread(memorised):
    model, tok, records, *_ = memorised
    rec = next(r for r in records if not r.get("system"))
    settings = GenerationSettings(do_sample=False, max_new_tokens=64)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        full = list(stream_chat(model, tok, rec["input"], settings=settings, fast=False))
        full_calls, calls[:] = len(calls), []
        threads = threading.active_count()
        stream = stream_chat(model, tok, rec["input"], settings=settings, fast=False)
        first = next(stream)
        stream.close()
        stopped_calls = len(calls)
    finally:
        hook.remove()
    assert len(full) > 3 and first == full[0]
    assert stopped_calls < full_calls - 2  # generate ended at the next token, not at the end of the reply
    assert threading.active_count() == threads  # the worker thread is gone


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
