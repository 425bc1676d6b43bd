"""The ChatGLM3 tokenizer, rebuilt on transformers' slow-tokenizer base (no remote code), and its standard twin.

ChatGLM3's own ``tokenization_chatglm.py`` breaks on transformers >= 4.45 (``_pad() got an unexpected
keyword argument 'padding_side'``) and on 5.x (``batch_encode_plus`` is gone).  :class:`ChatGLM3Tokenizer`
keeps the exact id layout and chat format of the original (docs/design.md §2.4) and is a normal
``PreTrainedTokenizer``, so ``Trainer(processing_class=...)``, ``tokenizer.pad`` and ``TextIteratorStreamer``
accept it.

**The standard twin.**  ``save_pretrained`` also writes what tools without glmlora need (vLLM, a plain
transformers script, ``pipeline``): ``tokenizer.json`` (a fast tokenizer built from the same sentencepiece
model), a ``tokenizer_config.json`` naming the standard ``PreTrainedTokenizerFast`` with ChatGLM3's chat
template, and ``tokenizer.model`` for glmlora itself (:func:`load_tokenizer` always builds
:class:`ChatGLM3Tokenizer` from that file, whatever the json files say).  In a fresh interpreter
``AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=True)`` gives
exactly :meth:`ChatGLM3Tokenizer.build_conversation`'s ids, and ``encode(text, add_special_tokens=False)``
exactly :meth:`ChatGLM3Tokenizer.encode_text`'s (tests/test_serving.py, on 60 conversations and 240 strings).

How that is exact.  The real ``tokenizer.model`` is a sentencepiece BPE model with byte fallback and a
dummy prefix: ``"你好"`` -> ``[36474 "▁你", 54591 "好"]``, ``"\\n"`` -> ``[30910 "▁", 13 <0x0A>]``, whitespace runs
kept (published ChatGLM3 ids; "▁" at 30910 is the first character after the merges, as in a BPE
vocabulary).  The tiny model is trained the same way (glmlora/tiny.py).  The fast twin reproduces it
piece for piece: the same vocabulary and merges ordered by sentencepiece's scores, byte fallback, and a
normalizer that prepends "▁" to every stretch of text between special tokens, which is sentencepiece's
dummy prefix for every separately encoded part.  ChatGLM3 encodes each message as
``[<|role|>] + sp(metadata + "\\n") + sp(content)``: two separate encodes, the second with its own "▁".  The
template writes ``<|role|>`` + metadata + ``"\\n"`` + ``" "`` + content: no vocabulary piece contains "\\n"
(it is the byte piece <0x0A>), so the newline separates the merges exactly as two encodes would, and the
space becomes the content's own "▁".  Empty content gets neither.  ``save_pretrained`` checks all this on
probe strings and conversations before it writes the twin, and writes no twin (with a note) if a
tokenizer.model ever breaks it.

**Role markers as text (what a string template means).**  A chat template is a string, so the standard
twin must turn the text ``<|user|>`` into the role id.  User text containing ``<|user|>``, ``<|assistant|>``,
``[gMASK]`` ... would then switch roles; the template refuses it instead (``apply_chat_template`` raises,
naming the marker).  Plain ``encode`` on the twin turns those markers, ``<s>``, ``</s>``, ``<unk>`` and the
words ``sop`` / ``eop`` standing alone into their special ids; pass ``split_special_tokens=True`` to keep
them text.  glmlora's own path never renders text: :meth:`~ChatGLM3Tokenizer.build_conversation` puts role
ids between separately encoded texts, so no user text can become a role token — that is why training,
chat and evaluation build prompts by id.

**The contract with the original tokenizer** (``tokenization_chatglm.py``; code ported from the original
tutorial gets the same ids):

- ``tokenizer(text)`` / ``encode(text)`` (``add_special_tokens=True``, the default) prepend ``[gMASK] sop``,
  as the original's do; a pair is ``[gMASK] sop A B </s>``.  The standard twin does the same.
- ``encode(text, add_special_tokens=False)`` and :meth:`~ChatGLM3Tokenizer.encode_text` are plain
  sentencepiece ids; ``<|user|>`` in text stays ordinary pieces (the original's default,
  ``encode_special_tokens=False``).  The original's ``encode_special_tokens=True`` is refused with a note:
  build role tokens by id.
- ``build_chat_input`` / ``build_message`` give the original's ids (its ``build_chat_input`` /
  ``build_single_message``) but return a list of ids, not a ``BatchEncoding``: wrap it as
  ``torch.tensor([ids])``.  ``get_command`` works as in the original.
- ``decode(ids)`` writes special tokens as text with the original's spacing (``<|user|> \\n 你好``).
  ``decode(ids, skip_special_tokens=True)`` drops all nine ChatGLM3 special tokens and ``<s>``/``</s>``/
  ``<unk>`` — deliberately unlike the original, which keeps ``[gMASK]``, ``sop`` and the role tokens there,
  so streamed and decoded replies never show control tokens.  Replies without special tokens decode
  identically.
- Padding: glmlora pads on the right by default (training collators) and on the left on request
  (``padding_side="left"``, batched generation); the original always pads left, as the standard twin does.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import AddedToken

#: The nine special tokens that follow the sentencepiece vocabulary, in id order (n, n+1, ...).
SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
VOCAB_FILE = "tokenizer.model"
#: Special tokens that are ordinary words: the standard twin only matches them standing alone, so
#: "people" or "Aesop" keep their pieces.
WORD_TOKENS = ("sop", "eop")
#: The markers the chat template refuses inside message text (they would switch roles).
TEXT_MARKERS = tuple(t for t in SPECIAL_TOKENS if t not in WORD_TOKENS)
#: The class the standard tokenizer_config.json names: transformers 4.x and 5.x both know it.
STANDARD_CLASS = "PreTrainedTokenizerFast"
SPIECE_UNDERLINE = "▁"

Message = dict[str, Any]

#: ChatGLM3's chat format as a chat template (see the module docstring for why the space before content).
CHAT_TEMPLATE = (
    "{#- ChatGLM3: [gMASK]sop, then per message <|role|> + metadata + newline + (space + content). -#}\n"
    "{%- if tools -%}{{- raise_exception(\"ChatGLM3 takes tools in a system message's 'tools' field "
    "(its own format), not as the tools argument\") -}}{%- endif -%}\n"
    "{{- '[gMASK]sop' -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{- raise_exception(\"unknown chat role '\" ~ message['role'] ~ \"'; ChatGLM3 knows system, user, "
    "assistant, observation\") -}}{%- endif -%}\n"
    "{%- set content = message['content'] or '' -%}\n"
    "{%- if message['tools'] is defined and message['tools'] is not none -%}"
    "{%- set content = content ~ '\\n' ~ (message['tools'] | tojson(indent=4)) -%}{%- endif -%}\n"
    "{%- set metadata = message['metadata'] if message['metadata'] is defined and message['metadata'] "
    "else '' -%}\n"
    "{%- for marker in " + json.dumps(list(TEXT_MARKERS)) + " -%}"
    "{%- if marker in content or marker in metadata -%}"
    "{{- raise_exception('message text contains the ChatGLM3 control marker ' ~ marker ~ ', which this "
    "template would turn into a control token; remove it (glmlora builds prompts by id and keeps it as "
    "text)') -}}{%- endif -%}{%- endfor -%}\n"
    "{{- '<|' ~ message['role'] ~ '|>' ~ metadata ~ '\\n' -}}\n"
    "{%- if content -%}{{- ' ' ~ content -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}\n"
)

#: Strings on which the standard twin must encode exactly like sentencepiece before it is written.
PROBE_TEXTS = (
    "", " ", "  ", "\n", "\n\n", "\t", "a", " a", "  a  ", "a\nb", "a \n b", "你好", " 你好", "我最近总是失眠，怎么办？",
    "Work is stressful.", "12345 678", "👋🙂", "x\ty", "  indented\n    code()", "混合 mixed 文本\n\n结尾 ",
    "people and Aesop", "<|user", "[gMASK", "ⓐ𝐀Ａ", "\u3000全角空格", "end\n",
)
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": " two  spaces\n"},
     {"role": "assistant", "content": "\nreply"}, {"role": "user", "content": ""}],
    [{"role": "system", "content": "tools", "tools": [{"name": "f", "parameters": {"x": "中"}}]},
     {"role": "user", "content": "call"}, {"role": "assistant", "metadata": "f", "content": "f(x=1)"},
     {"role": "observation", "content": "42"}],
)


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
        if kwargs.pop("encode_special_tokens", False):
            raise ValueError("encode_special_tokens=True (the original tokenizer's switch that turns '<|user|>' in "
                             "text into role tokens) is not supported: build prompts by id with "
                             "build_conversation / build_chat_input, or apply_chat_template")
        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        n = self.sp.get_piece_size()
        self._added_tokens_decoder = {
            n + i: AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False)
            for i, tok in enumerate(SPECIAL_TOKENS)
        }
        for key in ("added_tokens_decoder", "extra_special_tokens", "additional_special_tokens",
                    "chat_template", "tokenizer_file"):
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

    def get_command(self, token: str) -> int:
        """The original tokenizer's name for :meth:`special_id` (it also knows ``<bos>``/``<eos>``/``<pad>``)."""
        named = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        return named[token] if token in named else self.special_id(token)

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; ChatGLM3 knows {', '.join(ROLES)}")
        return self.special_id(f"<|{role}|>")

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on eos, or when the model starts a new user/observation turn."""
        return [self.eos_token_id, self.role_id("user"), self.role_id("observation")]

    # ---- special tokens around a sequence: the original's [gMASK] sop prefix ---------------------
    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """``[gMASK] sop A`` (pair: ``[gMASK] sop A B </s>``), as the original's ``encode`` builds it."""
        if token_ids_1 is None:
            return self.prefix_ids() + token_ids_0
        return self.prefix_ids() + token_ids_0 + token_ids_1 + [self.eos_token_id]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        if token_ids_1 is None:
            return [1, 1] + [0] * len(token_ids_0)
        return [1, 1] + [0] * (len(token_ids_0) + len(token_ids_1)) + [1]

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
        """Pieces between special tokens decoded by sentencepiece; special tokens written as text.

        Sentencepiece drops the dummy-prefix space only at the very start, as the original's decode and
        the standard twin do: ``<|user|>`` + ``▁`` + ``<0x0A>`` reads ``<|user|> \\n``.
        """
        out, run = [], []
        specials = set(SPECIAL_TOKENS) | {str(self.bos_token), str(self.eos_token), str(self.unk_token)}
        for tok in [*tokens, None]:
            if tok is not None and tok not in specials:
                run.append(tok)
                continue
            text = self.sp.decode_pieces(run)
            if out and run and run[0].startswith(SPIECE_UNDERLINE):
                text = " " + text
            out.append(text)
            if tok is not None:
                out.append(tok)
            run = []
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
    def build_message(self, role: str, content: str | None, metadata: str = "", tools: Any = None) -> list[int]:
        """``[<|role|>] + sp(metadata + "\\n") + sp(content)``; a system message may carry tools as JSON."""
        content = content or ""
        if tools is not None:
            content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
        ids = [self.role_id(role)] + self.encode_text((metadata or "") + "\n")
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

    def apply_chat_template(self, conversation: Sequence[Message] | Sequence[Sequence[Message]],
                            tools: list[Any] | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None, return_dict: bool = True,
                            **kwargs: Any) -> Any:
        """transformers' chat API, built by id (:meth:`build_conversation`), so it equals the standard twin.

        ``tokenize=False`` returns the text the standard twin's template renders.  Options that only make
        sense for a text template (``continue_final_message``, ``documents``, another ``chat_template``)
        are refused rather than ignored.
        """
        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False, {}))
        if tools or unsupported:
            raise ValueError(f"ChatGLM3Tokenizer.apply_chat_template does not support {unsupported or ['tools']}; "
                             f"tools go in a system message's 'tools' field")
        batched = bool(conversation) and not isinstance(conversation[0], dict)
        convs = list(conversation) if batched else [conversation]
        if not tokenize:
            texts = [_render(c, add_generation_prompt) for c in convs]
            return texts if batched else texts[0]
        ids = [self.build_conversation(c, add_generation_prompt) for c in convs]
        if not return_dict and not return_tensors:
            return ids if batched else ids[0]
        enc = BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
        if return_tensors:
            enc = self.pad(enc, padding_side="left", return_tensors=return_tensors)
        elif not batched:
            enc = BatchEncoding({k: v[0] for k, v in enc.items()})
        return enc if return_dict else enc["input_ids"]

    # ---- saving: glmlora's file plus the standard twin -------------------------------------------
    @property
    def standard(self) -> PreTrainedTokenizerFast | None:
        """The standard fast tokenizer (tokenizer.json + chat template), or None if it cannot be exact.

        Built once per tokenizer file and cached outside the instance, so pickling the tokenizer (datasets
        fingerprints it) stays cheap and stable.
        """
        stat = Path(self.vocab_file).stat()
        fast, problem = _standard_twin(str(Path(self.vocab_file).resolve()), stat.st_size, stat.st_mtime_ns)
        if problem:
            print(f"note: no tokenizer.json written for {self.vocab_file}: {problem}. glmlora loads the directory "
                  f"as before; tools without glmlora cannot.")
        return fast

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """``tokenizer.model`` plus the standard files (tokenizer.json, tokenizer_config.json, chat template).

        :func:`load_tokenizer` reads only ``tokenizer.model``; everything else is for tools without glmlora.
        """
        unsupported = sorted(k for k in ("push_to_hub", "filename_prefix") if kwargs.get(k))
        if unsupported:
            raise ValueError(f"ChatGLM3Tokenizer.save_pretrained does not support {', '.join(unsupported)}")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        if self.standard is not None:
            files += self.standard.save_pretrained(str(out), save_jinja_files=False)
            name_standard_class(out / "tokenizer_config.json")
        return tuple(files) + self.save_vocabulary(str(out))


def _render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The chat template rendered as text, exactly as the standard twin renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=CHAT_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


# ---- the standard twin -------------------------------------------------------------------------
def sentencepiece_proto(vocab_file: str | os.PathLike) -> Any:
    """The sentencepiece ``ModelProto`` of ``vocab_file`` (needs protobuf, like transformers' converters)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(vocab_file).read_bytes())
    return proto


def backend_tokenizer(vocab_file: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece BPE model, with the ChatGLM3 specials.

    Merges are ordered by the merged piece's score (sentencepiece merges the highest-scoring pair first);
    the normalizer reproduces the model's own normalization rules, dummy prefix and whitespace escaping;
    no pre-tokenizer, since sentencepiece does not split words when encoding.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    proto = sentencepiece_proto(vocab_file)
    if proto.trainer_spec.model_type != 2:  # ModelProto.TrainerSpec.BPE
        raise ValueError(f"{vocab_file}: a sentencepiece BPE model is expected (ChatGLM3's is one)")
    norm = proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, [(p.piece, p.score) for p in proto.pieces])
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback, dropout=None))
    steps: list[Any] = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    steps += [normalizers.Prepend(SPIECE_UNDERLINE)] if norm.add_dummy_prefix else []
    steps += [normalizers.Replace(" ", SPIECE_UNDERLINE)] if norm.escape_whitespaces else []
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    n = len(proto.pieces)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=t in WORD_TOKENS)
                            for t in SPECIAL_TOKENS])
    eos = proto.pieces[proto.trainer_spec.eos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A:0", pair=f"[gMASK] sop $A:0 $B:1 {eos}:1",
        special_tokens=[("[gMASK]", n + 1), ("sop", n + 3), (eos, proto.trainer_spec.eos_id)])
    return tok


def standard_tokenizer(vocab_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The standard fast tokenizer for a ChatGLM3 ``tokenizer.model``: what ``tokenizer.json`` holds."""
    proto = sentencepiece_proto(vocab_file)
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    ts = proto.trainer_spec
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend_tokenizer(vocab_file), unk_token=piece[ts.unk_id], bos_token=piece[ts.bos_id],
        eos_token=piece[ts.eos_id], pad_token=piece[ts.unk_id], padding_side="left",
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
    return fast


@lru_cache(maxsize=4)
def _standard_twin(vocab_file: str, size: int, mtime_ns: int) -> tuple[PreTrainedTokenizerFast | None, str]:
    """(twin, '') or (None, why not); keyed by the file's size and time so an edited file is rebuilt."""
    del size, mtime_ns  # part of the cache key only
    fast = standard_tokenizer(vocab_file)
    problem = twin_mismatch(ChatGLM3Tokenizer(vocab_file=vocab_file), fast)
    return (None, problem) if problem else (fast, "")


def twin_mismatch(tok: ChatGLM3Tokenizer, fast: PreTrainedTokenizerFast) -> str:
    """The first probe on which the standard twin and glmlora disagree ('' when none does)."""
    for text in PROBE_TEXTS:
        if fast.encode(text, add_special_tokens=False) != tok.encode_text(text):
            return f"the fast tokenizer encodes {text!r} differently from sentencepiece"
    for messages in PROBE_CONVERSATIONS:
        ids = fast.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        if ids != tok.build_conversation(messages, add_generation_prompt=True):
            return f"the chat template encodes {messages!r} differently from build_conversation"
    return ""


def name_standard_class(config_path: Path) -> None:
    """Name the class every transformers version knows (5.x would write its internal 'TokenizersBackend')."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = STANDARD_CLASS
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path: str | os.PathLike) -> ChatGLM3Tokenizer:
    """Load from a converted, merged or adapter directory, or straight from an original ChatGLM3 download.

    Only ``tokenizer.model`` is read: the json files next to it are for tools without glmlora (or, in an
    original download, point at remote code), so stale settings there (the ``can't set attribute
    'eos_token'`` error) cannot bite.
    """
    path = Path(path)
    vocab = path / VOCAB_FILE if path.is_dir() else path
    if not vocab.is_file():
        raise FileNotFoundError(f"no {VOCAB_FILE} in {path}: a ChatGLM3 model directory must contain the "
                                f"sentencepiece tokenizer file")
    return ChatGLM3Tokenizer(vocab_file=str(vocab))
