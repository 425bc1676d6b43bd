"""Chatting with ChatGLM3 the right way (lesson 06): format by ids, stop ids, history, streaming, batches.

Fixes of the original tutorial's loop: the prompt is built from role *ids* (not text), generation is
bounded by ``max_new_tokens`` (not ``max_length``, which counts the prompt), it stops on eos /
``<|user|>`` / ``<|observation|>``, and the history is kept — truncated oldest-first to fit the context.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from itertools import accumulate
from threading import Thread
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import TextIteratorStreamer

from .decoding import decode, decode_steps
from .tokenizer import ChatGLM3Tokenizer

Messages = list[dict[str, str]]
#: Context of the compiled CUDA path: one fixed-size static KV cache (28 KB per token on the 6B model),
#: so the compiled decode step never sees a new shape and is never recompiled between turns.
FAST_CONTEXT = 4096


@dataclass
class GenerationSettings:
    """The original chat's sampling defaults; set ``do_sample=False`` for reproducible (greedy) answers.

    ``top_k`` 50 is what transformers applied, unasked, under the original chat; it is spelled out here so that
    both generation paths sample alike. A ``repetition_penalty`` other than 1 needs ``generate`` (slower path).
    """

    max_new_tokens: int = 256
    do_sample: bool = True
    top_p: float = 0.8
    temperature: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        kw = asdict(self)
        if not self.do_sample:
            kw.pop("top_p"), kw.pop("temperature"), kw.pop("top_k")
        return kw


def fit_history(tokenizer: ChatGLM3Tokenizer, messages: Messages, max_context: int) -> Messages:
    """Drop the oldest exchanges until the prompt fits ``max_context`` tokens; never the system message.

    ``messages`` ends with the new user message.  Raises if even system + new message do not fit.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while True:
        prompt = tokenizer.build_conversation(system + rest, add_generation_prompt=True)
        if len(prompt) <= max_context:
            return system + rest
        if len(rest) <= 1:
            raise ValueError(f"the system message and the new message alone take {len(prompt)} tokens, more "
                             f"than the {max_context} allowed; shorten them or raise max_context")
        rest = rest[2:] if rest[0]["role"] == "user" and len(rest) > 2 else rest[1:]


def _fitted_prompts(tokenizer: ChatGLM3Tokenizer, conversations: Sequence[Messages], limit: int) -> list[list[int]]:
    """Prompt ids of every conversation, each shortened by :func:`fit_history` to ``limit`` tokens; says how many."""
    prompts, shortened = [], 0
    for i, conv in enumerate(conversations):
        try:
            fitted = fit_history(tokenizer, list(conv), limit)
        except ValueError as e:
            raise ValueError(f"conversation {i}: {e}") from None
        shortened += len(fitted) < len(conv)
        prompts.append(tokenizer.build_conversation(fitted, add_generation_prompt=True))
    if shortened:
        print(f"generate_batch: {shortened} of {len(prompts)} conversation(s) shortened to fit the context "
              f"({limit} prompt tokens; oldest exchanges dropped, system message kept)", flush=True)
    return prompts


_TOOL_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")


def split_reply(text: str) -> tuple[str, str]:
    """ChatGLM3 replies start with a metadata line (a tool name, normally empty): ``(metadata, content)``.

    A first line that is no tool name means the model skipped the metadata line (an untrained model
    does): then all of it is content, rather than a silently empty reply.
    """
    metadata, newline, content = text.partition("\n")
    metadata = metadata.strip()
    if not newline or (metadata and not _TOOL_NAME.match(metadata)):
        return "", text.strip()
    return metadata, content.strip()


def _context(model: Any, max_context: int | None, fast: bool) -> int:
    return max_context or (FAST_CONTEXT if fast else getattr(model.config, "max_position_embeddings", 8192))


def _prompt(tokenizer: ChatGLM3Tokenizer, messages: Messages, model: Any, settings: GenerationSettings,
            context: int) -> torch.Tensor:
    fitted = fit_history(tokenizer, messages, context - settings.max_new_tokens)
    return torch.tensor([tokenizer.build_conversation(fitted, add_generation_prompt=True)], device=model.device)


def static_cache(model: Any, context: int, batch_size: int = 1) -> Any:
    """The model's reusable static KV cache of ``context`` tokens for ``batch_size`` rows, emptied for reuse.

    One cache per (context, batch size): the compiled decode step then always sees the same shapes.
    """
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_glmlora_static_caches", {})
    cache = caches.get((context, batch_size))
    if cache is None:
        cache = caches[(context, batch_size)] = StaticCache(config=model.config, max_cache_len=context)
    else:
        with torch.inference_mode():  # its tensors were made during an inference-mode generate
            cache.reset()
    return cache


def _generate_kwargs(tokenizer: ChatGLM3Tokenizer, settings: GenerationSettings) -> dict[str, Any]:
    """``generate``'s arguments: stop ids + sampling settings."""
    return {"eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_token_id, **settings.kwargs()}


def _use_fast_path(model: Any, fast: bool | None, settings: GenerationSettings) -> bool:
    """``fast`` (default: on CUDA, except over a 4-bit base, whose compiled decode step was never measured) unless
    the settings need ``generate`` (the loop applies no repetition penalty)."""
    quantised = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    fast = bool(fast) if fast is not None else (model.device.type == "cuda" and not quantised)
    return fast and settings.repetition_penalty == 1.0


def _loop_settings(tokenizer: ChatGLM3Tokenizer, settings: GenerationSettings) -> dict[str, Any]:
    return dict(max_new_tokens=settings.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_token_id,
                do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p,
                top_k=settings.top_k)


def _new_ids(model: Any, tokenizer: ChatGLM3Tokenizer, ids: torch.Tensor, mask: torch.Tensor,
             settings: GenerationSettings, context: int | None, streamer: Any = None) -> torch.Tensor:
    """Generated ids ``(batch, n)`` after the prompt: :func:`glmlora.decoding.decode` on a static cache of
    ``context`` tokens when one is given (the fast path), else transformers' ``generate`` with a dynamic cache
    (and ``streamer``, if any)."""
    if context is not None:
        return decode(model, static_cache(model, context, ids.shape[0]), ids, mask,
                      **_loop_settings(tokenizer, settings))
    out = model.generate(ids, attention_mask=mask, streamer=streamer, **_generate_kwargs(tokenizer, settings))
    return out[:, ids.shape[1]:]


def conversation(query: str, history: Messages | None = None, system: str | None = None) -> Messages:
    """History plus the new user message, with ``system`` first unless the history already has one."""
    history = list(history or [])
    if system and not (history and history[0]["role"] == "system"):
        history = [{"role": "system", "content": system}] + history
    return history + [{"role": "user", "content": query}]


@torch.inference_mode()
def chat(model: Any, tokenizer: ChatGLM3Tokenizer, query: str, history: Messages | None = None,
         system: str | None = None, settings: GenerationSettings | None = None, max_context: int | None = None,
         fast: bool | None = None) -> tuple[str, Messages]:
    """One reply and the updated history (system, user and assistant messages)."""
    settings = settings or GenerationSettings()
    messages = conversation(query, history, system)
    fast = _use_fast_path(model, fast, settings)
    context = _context(model, max_context, fast)
    ids = _prompt(tokenizer, messages, model, settings, context)
    new = _new_ids(model, tokenizer, ids, torch.ones_like(ids), settings, context if fast else None)
    reply = decode_reply(tokenizer, new[0].tolist())
    return reply, messages + [{"role": "assistant", "content": reply}]


def decode_reply(tokenizer: ChatGLM3Tokenizer, new_ids: Sequence[int]) -> str:
    """Generated ids -> reply text: cut at the first stop id, drop the metadata line."""
    stops = set(tokenizer.stop_ids)
    cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    return split_reply(tokenizer.decode(list(new_ids[:cut]), skip_special_tokens=True))[1]


def stream_chat(model: Any, tokenizer: ChatGLM3Tokenizer, query: str, history: Messages | None = None,
                system: str | None = None, settings: GenerationSettings | None = None,
                max_context: int | None = None, fast: bool | None = None) -> Iterator[str]:
    """Yield the reply in pieces as it is generated.

    The metadata line is held back, so the pieces join to exactly what :func:`chat` returns. The fast path
    streams from :func:`glmlora.decoding.decode_steps` in this thread (a compiled CUDA graph must not be
    replayed from another thread); ``generate`` runs in a background thread with a ``TextIteratorStreamer``.
    Closing the generator early (a chat box's Stop) ends generation at the next token on both paths.
    """
    settings = settings or GenerationSettings()
    fast = _use_fast_path(model, fast, settings)
    context = _context(model, max_context, fast)
    ids = _prompt(tokenizer, conversation(query, history, system), model, settings, context)
    if fast:
        steps = decode_steps(model, static_cache(model, context), ids, torch.ones_like(ids), check_every=8,
                             **_loop_settings(tokenizer, settings))
        yield from _reply_pieces(_texts(tokenizer, steps))
        return
    streamer = ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(model=model, tokenizer=tokenizer, ids=ids, mask=torch.ones_like(ids), settings=settings,
                  context=None, streamer=streamer)
    worker = Thread(target=_generate_quietly, args=(kwargs,), daemon=True)
    worker.start()
    try:
        yield from _reply_pieces(accumulate(streamer))
    finally:  # also when the consumer stops early: the worker must not go on generating unseen
        streamer.cancel()
        worker.join()
    if isinstance(kwargs.get("error"), BaseException) and not isinstance(kwargs["error"], StreamCancelled):
        raise kwargs["error"]


def _settled(tokenizer: Any, ids: list[int], **decode_kwargs: Any) -> str | None:
    """The text of ``ids``, or None while it ends in half a UTF-8 character (more bytes are on their way)."""
    text = tokenizer.decode(ids, **decode_kwargs)
    return None if text.endswith("\ufffd") else text


def _texts(tokenizer: ChatGLM3Tokenizer, chunks: Iterator[list[int]]) -> Iterator[str]:
    """The text so far after each chunk of new ids (stop ids decode to nothing); never half a character."""
    ids: list[int] = []
    for chunk in chunks:
        ids += chunk
        text = _settled(tokenizer, ids, skip_special_tokens=True)
        if text is not None:
            yield text
    yield tokenizer.decode(ids, skip_special_tokens=True)


def _reply_pieces(texts: Iterator[str]) -> Iterator[str]:
    """New visible content from successive texts-so-far; the metadata line is never shown."""
    text, sent = "", 0
    for text in texts:
        content = _visible_content(text)
        if content is not None and len(content) > sent:
            yield content[sent:]
            sent = len(content)
    final = split_reply(text)[1]  # e.g. no metadata line at all: nothing was shown yet
    if len(final) > sent:
        yield final[sent:]


class StreamCancelled(Exception):
    """Raised inside ``generate`` by a cancelled :class:`ReplyStreamer`: the reader stopped listening."""


class ReplyStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that re-decodes the whole reply at every token, and can be cancelled.

    The stock streamer restarts decoding after each newline; sentencepiece then drops the leading space
    of the next piece, so the streamed text would differ from the final reply. Holding back a trailing
    incomplete UTF-8 character keeps every emitted piece final. ``generate`` hands every new token to
    :meth:`put`; after :meth:`cancel`, ``put`` raises :class:`StreamCancelled`, which ends ``generate`` there
    (the streamer is already shared by both threads, so no stopping criterion has to be passed in).
    """

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled:
            raise StreamCancelled("the reader stopped the stream")
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = _settled(self.tokenizer, self.token_cache, **self.decode_kwargs)
        if text is not None and len(text) > self.print_len:
            self.on_finalized_text(text[self.print_len:])
            self.print_len = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        self.on_finalized_text(text[self.print_len:], stream_end=True)
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True


def _visible_content(text: str) -> str | None:
    """The reply shown so far, or None while the first line may still be a metadata (tool name) line."""
    first, newline, _ = text.partition("\n")
    if not newline and (not first.strip() or _TOOL_NAME.match(first.strip())):
        return None
    return text.strip() if not newline else split_reply(text)[1]


def _generate_quietly(kwargs: dict[str, Any]) -> None:
    try:
        with torch.inference_mode():
            _new_ids(**{k: v for k, v in kwargs.items() if k != "error"})
    except BaseException as e:  # surfaced in the consumer thread
        kwargs["error"] = e
        kwargs["streamer"].end()


@torch.inference_mode()
def generate_batch(model: Any, tokenizer: ChatGLM3Tokenizer, conversations: Sequence[Messages],
                   settings: GenerationSettings | None = None, batch_size: int = 8,
                   progress: bool = True, fast: bool | None = None, max_context: int | None = None) -> list[str]:
    """Replies for many conversations at once: left-padded batches, similar lengths together.

    Each conversation ends with the user message to answer.  Order of the result = order of the input.
    Each is fitted to the context as :func:`chat` fits one (:func:`fit_history`: the oldest exchanges go, the
    system message stays, ``max_new_tokens`` are left free), and how many were shortened is printed.
    ``fast`` (default: on CUDA) runs :func:`glmlora.decoding.decode` on one static cache shared by all batches
    (the last batch is filled up with repeats, so the compiled step never sees a new shape; compiling it
    takes a while once). ``fast=False``: transformers' ``generate`` with a dynamic cache.
    """
    settings = settings or GenerationSettings(do_sample=False)
    fast = _use_fast_path(model, fast, settings)
    prompts = _fitted_prompts(tokenizer, conversations, _context(model, max_context, fast) - settings.max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    context = None
    if fast and prompts:
        batch_size = min(batch_size, len(prompts))
        context = 256 * math.ceil((max(map(len, prompts)) + settings.max_new_tokens) / 256)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress):
        rows = [{"input_ids": prompts[i]} for i in batch]
        if fast:
            rows += rows[-1:] * (batch_size - len(rows))
        enc = tokenizer.pad(rows, padding_side="left", return_tensors="pt").to(model.device)
        new = _new_ids(model, tokenizer, enc["input_ids"], enc["attention_mask"], settings, context)
        for row, i in enumerate(batch):
            replies[i] = decode_reply(tokenizer, new[row].tolist())
    return replies
