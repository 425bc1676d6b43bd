"""The chat box of lesson 06: logic in :class:`ChatSession` (unit-tested), widgets in :class:`ChatBox`."""

from __future__ import annotations

import html
from typing import Any, Callable, Iterator, Sequence

from .decoding import will_compile
from .generate import GenerationSettings, Messages, stream_chat

DISCLAIMER = ("This assistant is a teaching demo, not a therapist or a medical service. In a crisis, call your "
              "local emergency number or a hotline (China: 12356 or 400-161-9995; US: 988; UK & Ireland: "
              "Samaritans 116 123). 本助手仅为教学演示，不能替代专业心理咨询或医疗；如遇危机，请立即拨打 "
              "12356、400-161-9995 或 110/120。")


class ChatSession:
    """History + streaming replies; knows nothing about widgets."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None,
                 settings: GenerationSettings | None = None, max_context: int | None = None,
                 stream: Callable[..., Iterator[str]] = stream_chat) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.settings = settings or GenerationSettings()
        self.max_context = max_context
        self.history: Messages = []
        self._stream = stream

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; the exchange joins the history once the reply is complete."""
        text = text.strip()
        if not text:
            raise ValueError("empty message: type something first")
        pieces = []
        for piece in self._stream(self.model, self.tokenizer, text, self.history, self.system, self.settings,
                                  self.max_context):
            pieces.append(piece)
            yield piece
        if not self.history and self.system:
            self.history.append({"role": "system", "content": self.system})
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]

    def clear(self) -> None:
        self.history = []

    @property
    def exchanges(self) -> list[tuple[str, str]]:
        msgs = [m for m in self.history if m["role"] != "system"]
        return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 1, 2)]


def render_transcript(exchanges: list[tuple[str, str]], pending: tuple[str, str] | None = None) -> str:
    """The conversation as HTML bubbles; ``pending`` is the exchange still being streamed."""
    rows = []
    for user, reply in exchanges + ([pending] if pending else []):
        rows.append(f'<div style="text-align:right;margin:4px"><span style="background:#dbeafe;padding:4px 8px;'
                    f'border-radius:8px;display:inline-block">{html.escape(user)}</span></div>')
        rows.append(f'<div style="margin:4px"><span style="background:#f1f5f9;padding:4px 8px;border-radius:8px;'
                    f'display:inline-block;white-space:pre-wrap">{html.escape(reply) or "…"}</span></div>')
    return "".join(rows) or '<div style="color:#888">Say hello to start.</div>'


def memorised_hint(questions: Sequence[str]) -> str:
    """The line under a tiny model's box: what it can answer, and that only a fresh conversation works."""
    if not questions:
        return ""
    items = "".join(f"<li><code>{html.escape(q)}</code></li>" for q in questions)
    return ('<div style="font-size:85%;color:#555">This tiny model memorised single-question answers. Press '
            f'<b>Clear</b>, then send one of these exactly: <ul style="margin:2px 0">{items}</ul></div>')


class ChatBox:
    """Input, Send, Clear and a streamed transcript, on top of a :class:`ChatSession`."""

    def __init__(self, session: ChatSession, memorised: Sequence[str] = ()) -> None:
        """``memorised``: questions a tiny model learned by heart, listed under the box (send one as the first
        message of a fresh conversation: the tiny model learned single-question answers only)."""
        import ipywidgets as w

        self.session = session
        self.transcript = w.HTML(render_transcript([]))
        self.input = w.Text(placeholder="Type a message and press Enter or Send", layout=w.Layout(width="70%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.clear_button = w.Button(description="Clear")
        self.status = w.HTML("")
        self.send_button.on_click(lambda _: self.send())
        self.clear_button.on_click(lambda _: self.clear())
        self.input.on_submit(lambda _: self.send())
        notice = w.HTML(f'<div style="font-size:85%;color:#a33">{html.escape(DISCLAIMER)}</div>')
        hint = w.HTML(memorised_hint(memorised))
        self.widget = w.VBox([notice, self.transcript, w.HBox([self.input, self.send_button, self.clear_button]),
                              self.status, hint])

    def send(self) -> str:
        """Send the input box's text; returns the full reply (the transcript updates as it streams)."""
        text = self.input.value
        if not text.strip():
            self.status.value = "<i>Type a message first.</i>"
            return ""
        first = (" (the first reply compiles the decode step for the GPU: about a minute at 6B size, then it is"
                 " fast)" if will_compile(self.session.model) else "")
        self.input.value, self.status.value = "", f"<i>thinking…{first}</i>"
        self.send_button.disabled = True
        reply = ""
        try:
            for piece in self.session.send(text):
                reply += piece
                self.transcript.value = render_transcript(self.session.exchanges, (text, reply))
        finally:
            self.send_button.disabled = False
        self.transcript.value = render_transcript(self.session.exchanges)
        self.status.value = ""
        return reply

    def clear(self) -> None:
        self.session.clear()
        self.transcript.value = render_transcript([])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
