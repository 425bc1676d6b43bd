"""Serving without glmlora: the standard tokenizer files, the chat template and a plain-transformers generate.

Everything on the "plain" side runs in a fresh interpreter that never imports glmlora or peft, on the tiny
converted directory and on the tiny merged export; its ids must equal glmlora's exactly.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glmlora
from glmlora.export import export_merged
from glmlora.generate import GenerationSettings, chat
from glmlora.tokenizer import TEXT_MARKERS, load_tokenizer

N_CONVERSATIONS, N_STRINGS = 60, 240

# ---- deterministic test material --------------------------------------------------------------
EXPLICIT = [
    "", " ", "  ", "   leading spaces", "trailing spaces   ", "multiple   inner    spaces", "\t", "tab\tseparated\t",
    "\n", "\n\n", "\n\nstarts with blank lines", "ends with blank lines\n\n", "a\r\nwindows line", " \n \n ",
    "0", "0123456789", "3.14159", "１２３（全角数字）", "2026年12月6日", "我最近总是失眠，怎么办？",
    "Work is stressful and I can't sleep.", "   我\t很  累\n", "龘䶵𠀀𪚥鱻齉", "👋", "😶‍🌫️👍🏽🇨🇳", "❤️ ok",
    "混合 mixed ᴛᴇxᴛ Привет مرحبا नमस्ते 안녕 こんにちは", "people", "Aesop's fables", "sopping wet", "eops", "sop_",
    "<|user", "user|>", "<| user |>", "<|USER|>", "[gmask]", "[ gMASK ]", "<|tool|>", "[MASK", "<s", "/s>",
    "<||>", "<|assistant", "\u3000全角空格\u3000", "no\xa0break", "ﬁ ligature", "Ａ full width",
]
POOLS = {
    "en": ["I", "can't", "sleep", "at", "night", "work", "is", "stressful", "Thank", "you!", "self-care", "okay?",
           "people", "Aesop", "sopping", "ELSE", "x_y"],
    "zh": ["我", "最近", "总是", "失眠", "怎么办", "心理", "咨询", "焦虑", "谢谢你", "。", "，", "？", "！", "“引号”", "（括号）"],
    "rare": ["龘", "䶵", "𠀀", "𪚥", "鱻", "齉", "ㄅㄆ", "〇", "丶"],
    "emoji": ["👋", "🙂", "😶‍🌫️", "👍🏽", "🇨🇳", "❤️", "🫠", "☕"],
    "script": ["Привет", "مرحبا", "नमस्ते", "안녕하세요", "こんにちは", "Ωμέγα", "ñandú", "Straße", "ﬁ", "Ａ１２３", "①"],
    "digits": ["0", "42", "2026", "3.14159", "1,000,000", "２０２６", "007"],
    "space": [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u3000", "\xa0", "\t\t", "\n\n\n"],
    "lookalike": ["<|user", "user|>", "<| user |>", "<|USER|>", "[gmask]", "[ gMASK]", "<|tool|>", "[MASK", "<s",
                  "/s>", "<|", "|>", "<||>", "sop_x", "xsop", "eop1", "sopa"],
}
# Strings the standard tokenizer reads as special tokens (documented in glmlora/tokenizer.py).
SPECIAL_TEXT = re.compile("|".join(re.escape(m) for m in (*TEXT_MARKERS, "<s>", "</s>", "<unk>"))
                          + r"|(?<!\w)(sop|eop)(?!\w)")


def random_text(rng: random.Random) -> str:
    while True:
        kinds = rng.choices(list(POOLS), k=rng.randint(1, 7))
        text = "".join(rng.choice(POOLS[k]) + rng.choice(["", "", " ", "  ", "\n", "\t"]) for k in kinds)
        if rng.random() < 0.25:
            text = rng.choice(POOLS["space"]) + text
        if not SPECIAL_TEXT.search(text):
            return text


def plain_strings() -> list[str]:
    rng = random.Random(15)
    out = list(EXPLICIT)
    while len(out) < N_STRINGS:
        out.append(random_text(rng))
    return out


def conversations() -> list[tuple[list[dict], bool]]:
    """System or not, 1-4 turns, tool calls with metadata and observations, empty contents, with or without
    the generation prompt."""
    rng = random.Random(16)
    out = []
    for i in range(N_CONVERSATIONS):
        msgs: list[dict] = []
        if i % 3:
            msgs.append({"role": "system", "content": random_text(rng)})
        if i % 10 == 5:
            msgs.append({"role": "system", "content": "你可以使用工具。", "tools": [
                {"name": "get_hotline", "description": "心理援助热线 ☎", "parameters": {"country": {"type": "string"}}}]})
        for turn in range(1 + i % 4):
            msgs.append({"role": "user", "content": "" if (i + turn) % 11 == 0 else random_text(rng)})
            if i % 7 == 3:
                msgs += [{"role": "assistant", "metadata": "get_hotline", "content": "tool_call(country='中国')"},
                         {"role": "observation", "content": random_text(rng)}]
            if turn < i % 4:
                msgs.append({"role": "assistant", "content": random_text(rng)})
        out.append((msgs, i % 5 != 4))
    return out


MARKER_STRINGS = ["hi <|user|> there", "[gMASK]sop<|assistant|>\n", "a </s> b <s>", "sop", "the word eop.",
                  " <|observation|> x [MASK] y [sMASK]"]

TOKENIZER_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
d, src, dst = sys.argv[1:4]
case = json.load(open(src, encoding="utf-8"))
tok = AutoTokenizer.from_pretrained(d)
out = {"class": type(tok).__name__, "padding_side": tok.padding_side, "eos": tok.eos_token_id}
out["template"] = [tok.apply_chat_template(m, add_generation_prompt=g, tokenize=True, return_dict=False)
                   for m, g in case["conversations"]]
out["text"] = [tok.apply_chat_template(m, add_generation_prompt=g, tokenize=False) for m, g in case["conversations"]]
out["plain"] = [tok.encode(s, add_special_tokens=False) for s in case["strings"]]
out["with_prefix"] = [tok(s)["input_ids"] for s in case["strings"][:20]]
out["decoded"] = [tok.decode(i) for i in out["template"]]
out["decoded_skip"] = [tok.decode(i, skip_special_tokens=True) for i in out["template"]]
out["markers"] = [tok.encode(s, add_special_tokens=False) for s in case["markers"]]
out["markers_split"] = [tok.encode(s, add_special_tokens=False, split_special_tokens=True) for s in case["markers"]]
refused = []
for bad in case["refused"]:
    try:
        tok.apply_chat_template(bad, add_generation_prompt=True)
        refused.append(None)
    except Exception as e:
        refused.append(str(e))
out["refused"] = refused
out["imported"] = sorted(m for m in ("glmlora", "peft") if m in sys.modules)
json.dump(out, open(dst, "w", encoding="utf-8"), ensure_ascii=False)
"""


def run_fresh(script: str, args: list[str], tmp_path: Path) -> dict:
    """Run ``script`` in a new interpreter (no glmlora, no peft imported) and read the JSON it writes."""
    out = tmp_path / "fresh_out.json"
    done = subprocess.run([sys.executable, "-c", script, *args, str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result.pop("imported") == []
    return result


@pytest.fixture(scope="module")
def merged_dir(memorised_once, tmp_path_factory) -> Path:
    import copy

    model, tok, *_ = memorised_once
    return export_merged(copy.deepcopy(model), tok, tmp_path_factory.mktemp("serving") / "tiny-merged")


@pytest.fixture(scope="module", params=["converted", "merged"])
def plain_side(request, tiny_original, tmp_path_factory) -> tuple[Path, dict, dict]:
    """(directory, the test material, what plain transformers made of it in a fresh interpreter)."""
    directory = glmlora.ensure_native(tiny_original) if request.param == "converted" \
        else request.getfixturevalue("merged_dir")
    tmp = tmp_path_factory.mktemp(f"fresh-{request.param}")
    case = {"conversations": conversations(), "strings": plain_strings(), "markers": MARKER_STRINGS,
            "refused": [[{"role": "user", "content": f"please {m} now"}] for m in TEXT_MARKERS]}
    (tmp / "case.json").write_text(json.dumps(case, ensure_ascii=False), encoding="utf-8")
    return directory, case, run_fresh(TOKENIZER_SCRIPT, [str(directory), str(tmp / "case.json")], tmp)


def test_the_material_is_as_large_and_varied_as_promised():
    convs, strings = conversations(), plain_strings()
    assert len(convs) >= 50 and len(strings) >= 200 and len(set(strings)) > 230
    roles = {m["role"] for c, _ in convs for m in c}
    assert roles == {"system", "user", "assistant", "observation"}
    assert any(not any(m["role"] == "system" for m in c) for c, _ in convs)
    assert any("tools" in m for c, _ in convs for m in c) and any(m.get("metadata") for c, _ in convs for m in c)
    assert any(m["content"] == "" for c, _ in convs for m in c)
    joined = "".join(strings)
    for needle in ("  ", "\t", "\n\n", "\u3000", "𠀀", "😶‍🌫️", "Привет", "１２３", "<|user"):
        assert needle in joined, needle
    assert any(s.startswith(" ") for s in strings) and any(s.endswith(" ") for s in strings)


def test_directory_names_a_standard_class(plain_side):
    directory, _, plain = plain_side
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer.model").is_file()
    assert plain["padding_side"] == "left" and plain["eos"] == 2


def test_chat_template_ids_equal_build_conversation(plain_side):
    directory, case, plain = plain_side
    tok = load_tokenizer(directory)
    for (messages, gen), ids, text in zip(case["conversations"], plain["template"], plain["text"]):
        assert ids == tok.build_conversation(messages, add_generation_prompt=gen), messages
        assert text == tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_plain_encode_equals_encode_text(plain_side):
    directory, case, plain = plain_side
    tok = load_tokenizer(directory)
    for text, ids, prefixed in zip(case["strings"], plain["plain"], plain["with_prefix"] + [None] * N_STRINGS):
        assert ids == tok.encode_text(text), text
        if prefixed is not None:  # add_special_tokens=True: the original's [gMASK] sop prefix, on both sides
            assert prefixed == tok(text)["input_ids"] == tok.prefix_ids() + ids


def test_decoding_agrees_with_glmlora(plain_side):
    directory, _, plain = plain_side
    tok = load_tokenizer(directory)
    for ids, text, skipped in zip(plain["template"], plain["decoded"], plain["decoded_skip"]):
        assert text == tok.decode(ids) and skipped == tok.decode(ids, skip_special_tokens=True)


def test_marker_text_is_special_on_the_plain_side_unless_split(plain_side):
    """The documented difference: a string template needs text markers; glmlora never reads them from text."""
    directory, case, plain = plain_side
    tok = load_tokenizer(directory)
    specials = set(range(tok.sp.get_piece_size(), len(tok))) | {0, 1, 2}
    for text, ids, split in zip(case["markers"], plain["markers"], plain["markers_split"]):
        assert split == tok.encode_text(text) and not specials & set(split)
        assert specials & set(ids), text


def test_template_refuses_marker_text_in_messages(plain_side):
    _, _, plain = plain_side
    for marker, message in zip(TEXT_MARKERS, plain["refused"]):
        assert message is not None and marker in message and "glmlora builds prompts by id" in message


# ---- the plain-transformers snippet (README / lesson 06) -----------------------------------------
SNIPPET = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="auto")
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)  # stops on eos, <|user|>, <|observation|>
new = out[0, inputs["input_ids"].shape[1]:]
reply = tokenizer.decode(new, skip_special_tokens=True).strip()
print(reply)
"""

SNIPPET_RUNNER = """
import json, sys
model_dir, messages_file, dst = sys.argv[1:4]
messages = json.load(open(messages_file, encoding="utf-8"))
exec(compile(SNIPPET, "snippet", "exec"))
json.dump({"prompt": inputs["input_ids"][0].tolist(), "new": new.tolist(), "reply": reply,
           "imported": sorted(m for m in ("glmlora", "peft") if m in sys.modules)},
          open(dst, "w", encoding="utf-8"), ensure_ascii=False)
"""


def test_plain_transformers_snippet_generates_what_glmlora_generates(memorised, merged_dir, tmp_path):
    model, tok, records, _, convs = memorised
    messages = convs[0][:-1]  # a memorised question: the answer ends on a stop id
    (tmp_path / "messages.json").write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    plain = run_fresh(f"SNIPPET = {SNIPPET!r}\n" + SNIPPET_RUNNER, [str(merged_dir), str(tmp_path / "messages.json")],
                      tmp_path)
    prompt = tok.build_conversation(messages, add_generation_prompt=True)
    assert plain["prompt"] == prompt
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=256, do_sample=False,
                              eos_token_id=tok.stop_ids, pad_token_id=0)[0, len(prompt):].tolist()
    assert plain["new"] == ours
    assert plain["new"][-1] in tok.stop_ids and len(plain["new"]) < 256  # stopped on a stop id, not the limit
    reply, _ = chat(model, tok, messages[-1]["content"], history=messages[:-1],
                    settings=GenerationSettings(do_sample=False, max_new_tokens=256))
    assert plain["reply"] == reply == records[0]["output"].strip()
