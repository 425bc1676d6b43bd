"""The chat box of lesson 06: logic in :class:`ChatSession` (unit-tested), widgets in :class:`ChatBox`.

Every part of the box carries a CSS class (``glmlora-chatbox``, ``-transcript``, ``-input``, ``-send``, ``-stop``,
``-clear``, ``-status``, ``-memorised``), so a browser test, or a learner's own CSS, can find it.
"""

from __future__ import annotations

import asyncio
import html
from typing import Any, Callable, Generator, Iterator, Sequence

from .decoding import will_compile
from .generate import GenerationSettings, Messages, stream_chat

DISCLAIMER = ("This assistant is a teaching demo, not a therapist or a medical service. In a crisis, call your "
              "local emergency number or a hotline (China: 12356 or 400-161-9995; US: 988; UK & Ireland: "
              "Samaritans 116 123). 本助手仅为教学演示，不能替代专业心理咨询或医疗；如遇危机，请立即拨打 "
              "12356、400-161-9995 或 110/120。")
EMPTY_MESSAGE = "<i>Type a message first.</i>"
STREAMING = "<i>replying… (Stop ends the reply here)</i>"
STOPPED = "<i>Stopped. The reply so far stays in the conversation.</i>"
#: Send and Enter wait until the typed text has been still this long (see ChatBox._send_when_typed).
SETTLE_SECONDS = 0.25
#: Text in HTML widgets otherwise inherits the widgets' one-line height (28 px) for every line.
TEXT = "line-height:1.45"
#: The transcript keeps this height and scrolls inside it, so the input row never moves down the page.
TRANSCRIPT_HEIGHT = "20em"


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

    def send(self, text: str) -> Generator[str, None, None]:
        """Stream the reply to ``text``; the exchange joins the history when the reply ends.

        Closing this generator part-way (a Stop button) ends generation at once and keeps the reply so far in
        the history, so that the conversation the learner saw and the one the model sees next stay the same.
        An error while generating keeps nothing.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty message: type something first")
        pieces: list[str] = []
        stream = self._stream(self.model, self.tokenizer, text, self.history, self.system, self.settings,
                              self.max_context)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except GeneratorExit:
            stream.close()  # stream_chat stops the model at its next token
            self._record(text, "".join(pieces))
            raise
        self._record(text, "".join(pieces))

    def _record(self, text: str, reply: str) -> None:
        if not self.history and self.system:
            self.history.append({"role": "system", "content": self.system})
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def clear(self) -> None:
        self.history = []

    @property
    def exchanges(self) -> list[tuple[str, str]]:
        msgs = [m for m in self.history if m["role"] != "system"]
        return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 1, 2)]


def render_transcript(exchanges: list[tuple[str, str]], pending: tuple[str, str] | None = None) -> str:
    """The conversation as HTML bubbles, oldest first, in a box of fixed height; ``pending`` is still streaming.

    The box is a flex column in reverse order around one inner block. A browser anchors such a box at its end:
    it opens scrolled to the newest message, and since every update replaces this HTML (which puts an ordinary
    box back at the top), that is what keeps the newest words in view while a reply streams. A script that
    scrolls would not help: the HTML widget does not run scripts.
    """
    rows = []
    for user, reply in exchanges + ([pending] if pending else []):
        rows.append(f'<div style="text-align:right;margin:4px"><span class="glmlora-user" style="background:#dbeafe;'
                    f'padding:4px 8px;border-radius:8px;display:inline-block;white-space:pre-wrap;text-align:left">'
                    f'{html.escape(user)}</span></div>')
        rows.append(f'<div style="margin:4px"><span class="glmlora-reply" style="background:#f1f5f9;padding:4px 8px;'
                    f'border-radius:8px;display:inline-block;white-space:pre-wrap">{html.escape(reply) or "…"}'
                    f'</span></div>')
    body = "".join(rows) or '<div style="color:#888;margin:4px">Say hello to start.</div>'
    return (f'<div class="glmlora-scroll" style="height:{TRANSCRIPT_HEIGHT};overflow-y:auto;display:flex;'
            f'flex-direction:column-reverse;border:1px solid #e2e8f0;border-radius:6px;padding:2px;{TEXT}">'
            f'<div>{body}</div></div>')


def memorised_hint(questions: Sequence[str]) -> str:
    """The line under a tiny model's box: what it can answer, and that only a fresh conversation works."""
    if not questions:
        return ""
    items = "".join(f"<li><code>{html.escape(q)}</code></li>" for q in questions)
    return (f'<div style="font-size:85%;color:#555;{TEXT}">This tiny model memorised single-question answers: '
            'send one of these exactly, as the first message of a conversation (press <b>Clear</b> before the next '
            f'one):<ul style="margin:2px 0">{items}</ul></div>')


def error_status(error: BaseException) -> str:
    """An error as one line for the box's status, instead of a traceback in the cell's output."""
    return (f'<span style="color:#b91c1c">Error: {html.escape(type(error).__name__)}: {html.escape(str(error))}'
            '</span>')


class ChatBox:
    """Input, Send, Stop and Clear, and a streamed transcript, on top of a :class:`ChatSession`.

    While a reply streams, the input row (text box, Enter, Send, Clear) is disabled and only Stop is live.
    Send and Enter stream on the kernel's event loop and hand control back to it after every piece: a kernel
    handles widget messages one at a time, so a Stop click would otherwise wait until the whole reply is done.
    The model still runs in the kernel's own thread (a compiled CUDA graph must be replayed in the thread that
    recorded it). :meth:`send`, for code, streams straight through and returns the reply.
    """

    def __init__(self, session: ChatSession, memorised: Sequence[str] = ()) -> None:
        """``memorised``: questions a tiny model learned by heart, listed under the box (send one as the first
        message of a fresh conversation: the tiny model learned single-question answers only)."""
        import ipywidgets as w

        self.session = session
        self.busy, self.error = False, None
        self._stop_requested = False
        self._task: asyncio.Task | None = None
        self.transcript = w.HTML(render_transcript([])).add_class("glmlora-transcript")
        self.input = w.Text(placeholder="Type a message and press Enter or Send",
                            layout=w.Layout(flex="1 1 auto", width="auto")).add_class("glmlora-input")
        self.send_button = w.Button(description="Send", button_style="primary").add_class("glmlora-send")
        self.stop_button = w.Button(description="Stop", disabled=True, tooltip="End the reply here",
                                    layout=w.Layout(width="auto")).add_class("glmlora-stop")
        self.clear_button = w.Button(description="Clear", tooltip="Start a new conversation",
                                     layout=w.Layout(width="auto")).add_class("glmlora-clear")
        self.status = w.HTML("").add_class("glmlora-status")
        self.send_button.on_click(lambda _: self._on_send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.input.on_msg(self._on_input_message)  # Enter (on_submit is deprecated; this is what it listens to)
        notice = w.HTML(f'<div style="font-size:85%;color:#a33;{TEXT}">{html.escape(DISCLAIMER)}</div>')
        hint = w.HTML(memorised_hint(memorised)).add_class("glmlora-memorised")
        row = w.HBox([self.input, self.send_button, self.stop_button, self.clear_button])
        self.widget = w.VBox([notice, self.transcript, row, self.status, hint]).add_class("glmlora-chatbox")

    def send(self) -> str:
        """Send the input box's text and wait for the whole reply (for code: notebooks, tests); returns it.

        An error is shown in the status line and raised again, so a cell that calls this fails visibly.
        """
        text = self._begin()
        if text is None:
            return ""
        reply = _run_to_end(self._stream(text))
        if self.error is not None:
            raise self.error
        return reply

    def stop(self) -> None:
        """End the reply being streamed after the next piece (the Stop button)."""
        if self.busy:
            self._stop_requested = True
            self.stop_button.disabled = True
            self.status.value = "<i>stopping…</i>"

    def clear(self) -> None:
        """Start a new conversation (the Clear button); ignored while a reply streams."""
        if self.busy:
            return
        self.session.clear()
        self.transcript.value = render_transcript([])
        self.status.value = ""

    def _on_input_message(self, _: Any, content: dict, buffers: list) -> None:
        if content.get("event") == "submit":
            self._on_send()

    def _on_send(self) -> None:
        """Send or Enter: stream in a task on the kernel's event loop (plain Python has none: right away)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            text = self._begin()
            if text is not None:
                _run_to_end(self._stream(text))
            return
        if self._task is None or self._task.done():  # else a send is under way: this click came twice
            self._task = loop.create_task(self._send_when_typed())

    async def _send_when_typed(self) -> None:
        """Wait until the typed text has stopped changing, then send it, one piece at a time.

        The browser sends a click or Enter at once, but the text as throttled updates, one in flight at a time, so
        the last keystrokes can reach the kernel after the click (fast typing, a slow link to a cloud notebook).
        """
        typed = self.input.value
        await asyncio.sleep(SETTLE_SECONDS)
        while self.input.value != typed:
            typed = self.input.value
            await asyncio.sleep(SETTLE_SECONDS)
        text = self._begin()
        if text is not None:
            await _step_through(self._stream(text))

    def _begin(self) -> str | None:
        """Take the typed text and lock the input row; None (and a hint) if there is nothing to send."""
        if self.busy:  # an Enter that was on its way before the row was disabled
            return None
        text = self.input.value.strip()
        if not text:
            self.status.value = EMPTY_MESSAGE
            return None
        first = (" (the first reply compiles the decode step for the GPU: 10-25 s at 6B size, 3-9 s"
                 " when an earlier session cached it, then it is fast)" if will_compile(self.session.model) else "")
        self.busy, self._stop_requested, self.error = True, False, None
        self.input.value = ""
        self._lock_row(True)
        self.status.value = f"<i>thinking…{first}</i>"
        return text

    def _stream(self, text: str) -> Generator[None, None, str]:
        """Show the reply as it grows; pauses (yields) after every piece, where a Stop click takes effect."""
        reply, stopped = "", False
        try:
            pieces = self.session.send(text)
            for piece in pieces:
                if not reply:
                    self.status.value = STREAMING
                reply += piece
                self.transcript.value = render_transcript(self.session.exchanges, (text, reply))
                yield
                if self._stop_requested:
                    pieces.close()  # the session keeps the reply so far
                    stopped = True
                    break
        except Exception as e:  # shown in the box; the typed text comes back for another try
            self.error = e
            self.input.value = text
        finally:  # the status last: whoever sees it change (a person, a browser test) sees the row open again
            self.transcript.value = render_transcript(self.session.exchanges)
            self.busy = False
            self._lock_row(False)
            self.status.value = error_status(self.error) if self.error else STOPPED if stopped else ""
        return reply

    def _lock_row(self, locked: bool) -> None:
        self.input.disabled = self.send_button.disabled = self.clear_button.disabled = locked
        self.stop_button.disabled = not locked

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _run_to_end(steps: Generator[None, None, str]) -> str:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def _step_through(steps: Generator[None, None, Any]) -> None:
    """Advance ``steps`` one piece at a time, letting the event loop handle messages (a Stop click) in between."""
    for _ in steps:
        await asyncio.sleep(0)
