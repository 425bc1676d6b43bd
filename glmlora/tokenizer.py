"""The ChatGLM3 tokenizer, rebuilt on transformers' slow-tokenizer base (no remote code).

ChatGLM3's own ``tokenization_chatglm.py`` breaks on transformers >= 4.45 (``_pad() got an unexpected
keyword argument 'padding_side'``) and on 5.x (``batch_encode_plus`` is gone).  This class keeps the exact
id layout and chat format of the original (DESIGN.md §2.4) and is a normal ``PreTrainedTokenizer``, so
``Trainer(processing_class=...)``, ``tokenizer.pad`` and ``TextIteratorStreamer`` accept it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

#: The nine special tokens that follow the sentencepiece vocabulary, in id order (n, n+1, ...).
SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
VOCAB_FILE = "tokenizer.model"

Message = dict[str, Any]


class ChatGLM3Tokenizer(PreTrainedTokenizer):
    """Sentencepiece + the ChatGLM3 role tokens, with the original's ids (real model: [gMASK]=64790 ...).

    Text is always encoded by sentencepiece alone: a user who types ``<|user|>`` gets ordinary pieces,
    never a role switch.  Role markers only come from :meth:`build_message`, by id.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        if not vocab_file or not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"ChatGLM3 tokenizer file not found: {vocab_file!r} (expected the sentencepiece "
                f"'{VOCAB_FILE}' that ships with the model)")
        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        n = self.sp.get_piece_size()
        self._added_tokens_decoder = {
            n + i: AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False)
            for i, tok in enumerate(SPECIAL_TOKENS)
        }
        for key in ("added_tokens_decoder", "extra_special_tokens", "additional_special_tokens"):
            kwargs.pop(key, None)
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(extra_special_tokens=list(SPECIAL_TOKENS), **kwargs)

    # ---- the id layout -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        vocab.update({t: self.sp.get_piece_size() + i for i, t in enumerate(SPECIAL_TOKENS)})
        return vocab

    def special_id(self, token: str) -> int:
        """Id of one of :data:`SPECIAL_TOKENS` (``"[gMASK]"``, ``"<|user|>"``, ...)."""
        if token not in SPECIAL_TOKENS:
            raise KeyError(f"not a ChatGLM3 special token: {token!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.sp.get_piece_size() + SPECIAL_TOKENS.index(token)

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; ChatGLM3 knows {', '.join(ROLES)}")
        return self.special_id(f"<|{role}|>")

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on eos, or when the model starts a new user/observation turn."""
        return [self.eos_token_id, self.role_id("user"), self.role_id("observation")]

    # ---- text <-> pieces -----------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:  # noqa: ARG002 - kwargs kept for the API
        # Deliberately bypasses the added-token splitter: special tokens never come from text.
        return self.sp.encode(text, out_type=str)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        # The embedding is padded past the vocabulary (6B: 65,024 rows for 64,798 tokens); an untrained
        # model can emit those padding ids, which stand for no text.
        return self.sp.id_to_piece(index) if 0 <= index < self.sp.get_piece_size() else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run = [], []
        specials = set(SPECIAL_TOKENS) | {str(self.bos_token), str(self.eos_token), str(self.unk_token)}
        for tok in tokens:
            if tok in specials:
                out.append(self.sp.decode_pieces(run))
                out.append(tok)
                run = []
            else:
                run.append(tok)
        out.append(self.sp.decode_pieces(run))
        return "".join(out)

    def encode_text(self, text: str) -> list[int]:
        """Plain sentencepiece ids for ``text`` (no special tokens, ever)."""
        return self.sp.encode(text)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if Path(self.vocab_file).resolve() != target.resolve():
            target.write_bytes(Path(self.vocab_file).read_bytes())
        return (str(target),)

    # ---- the chat format -----------------------------------------------------------------------
    def build_message(self, role: str, content: str, metadata: str = "", tools: Any = None) -> list[int]:
        """``[<|role|>] + sp(metadata + "\\n") + sp(content)``; a system message may carry tools as JSON."""
        if tools is not None:
            content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
        ids = [self.role_id(role)] + self.encode_text(metadata + "\n")
        return ids + (self.encode_text(content) if content else [])

    def prefix_ids(self) -> list[int]:
        return [self.special_id("[gMASK]"), self.special_id("sop")]

    def build_conversation(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """``[gMASK] sop`` + every message; with ``add_generation_prompt`` end on ``<|assistant|>``."""
        ids = self.prefix_ids()
        for m in messages:
            ids += self.build_message(m["role"], m["content"], m.get("metadata", ""), m.get("tools"))
        if add_generation_prompt:
            ids.append(self.role_id("assistant"))
        return ids

    def build_chat_input(self, query: str, history: Iterable[Message] = (), role: str = "user") -> list[int]:
        """The original ``tokenizer.build_chat_input``: history + one new message, ready to generate."""
        return self.build_conversation([*history, {"role": role, "content": query}], add_generation_prompt=True)


def load_tokenizer(path: str | os.PathLike) -> ChatGLM3Tokenizer:
    """Load from a converted directory or straight from an original ChatGLM3 download.

    An original download's ``tokenizer_config.json`` points at remote code; only its ``tokenizer.model``
    is used, so stale remote-code settings (the ``can't set attribute 'eos_token'`` error) cannot bite.
    """
    path = Path(path)
    vocab = path / VOCAB_FILE if path.is_dir() else path
    if not vocab.is_file():
        raise FileNotFoundError(f"no {VOCAB_FILE} in {path}: a ChatGLM3 model directory must contain the "
                                f"sentencepiece tokenizer file")
    config = path / "tokenizer_config.json"
    if path.is_dir() and config.is_file() and "ChatGLM3Tokenizer" in config.read_text(encoding="utf-8"):
        return ChatGLM3Tokenizer.from_pretrained(str(path))
    return ChatGLM3Tokenizer(vocab_file=str(vocab))
