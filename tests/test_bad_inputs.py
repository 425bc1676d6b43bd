"""Bad inputs a learner plausibly gives, through the documented entry points: data files (``load_records``, as
lesson 03 reads them, and ``python -m glmlora.train``), training YAMLs (``python -m glmlora.train --config``),
model directories (``glmlora.load``) and checkpoint folders (``resume``).

Each case must end in ONE message that names the place (file and line, and the field or key), of the kind the
case expects — before any model is built, converted or loaded — and leave nothing written or trained. Nothing
here loads a model: the suite runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmlora
from glmlora.chatglm3 import ConversionError, native_dir_for
from glmlora.data import DataError, load_records
from glmlora.train import main
from glmlora.training import last_checkpoint

from conftest import copy_checkpoint

GOOD = json.dumps({"system": "你是心理咨询助手。", "input": "我睡不着。", "output": "试试固定起床时间。"}, ensure_ascii=False)
MULTI = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def msgs(*pairs) -> str:
    return line({"messages": [{"role": r, "content": c} for r, c in pairs]})


# ---------------------------------------------------------------------------------------------- data files
# (id, file contents, line named (0: the file), text the message must contain)
DATA_CASES = [
    ("unclosed-brace", f'{GOOD}\n{{"input": "a", "output": "b"\n', 2, "not valid JSON"),
    ("trailing-comma", f'{GOOD}\n{{"input": "a", "output": "b",}}\n', 2, "not valid JSON"),
    ("python-quotes", f"{GOOD}\n{{'input': 'a', 'output': 'b'}}\n", 2, "not valid JSON (Expecting property name"),
    ("two-records-one-line", f"{GOOD}{GOOD}\n", 1, "not valid JSON (Extra data"),
    ("missing-output", f'{GOOD}\n{line({"input": "a"})}\n', 2, "field 'output': is missing"),
    ("missing-input", f'{line({"output": "b"})}\n', 1, "field 'input': is missing"),
    ("empty-output", f'{line({"input": "a", "output": ""})}\n', 1, "field 'output': is empty"),
    ("blank-output", line({"input": "a", "output": "  \n "}) + "\n", 1, "field 'output': is empty"),
    ("number-output", f'{line({"input": "a", "output": 42})}\n', 1, "field 'output': must be a string, got int"),
    ("nan-output", '{"input": "a", "output": NaN}\n', 1, "field 'output': must be a string, got float"),
    ("list-input", f'{line({"input": ["a"], "output": "b"})}\n', 1, "field 'input': must be a string, got list"),
    ("number-system", f'{line({"system": 1, "input": "a", "output": "b"})}\n', 1, "field 'system': must be a string"),
    ("typo-field", f'{line({"input": "a", "ouput": "b"})}\n', 1, "field 'ouput': unknown field"),
    ("alpaca-instruction", f'{line({"instruction": "i", "input": "a", "output": "b"})}\n', 1,
     "field 'instruction': unknown field (an Alpaca-style record"),
    ("history-field", f'{line({"input": "a", "output": "b", "history": [["q", "r"]]})}\n', 1,
     "field 'history': unknown field (multi-turn history is written as {\"messages\""),
    ("sharegpt-record", f'{line({"conversations": [{"from": "human", "value": "hi"}]})}\n', 1,
     "field 'conversations': unknown field (a ShareGPT-style record"),
    ("prompt-response", f'{line({"prompt": "a", "response": "b"})}\n', 1,
     "field 'prompt': unknown field (the question"),
    ("duplicate-key", f'{GOOD}\n{{"input": "a", "output": "b", "output": "c"}}\n', 2,
     "field 'output': appears more than once in this record"),
    ("duplicate-key-in-message",
     '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}\n', 1,
     "field 'messages[0].content': appears more than once"),
    ("lone-surrogate", '{"input": "a", "output": "emoji \\ud83d broken"}\n', 1,
     "field 'output': contains an unpaired surrogate \\ud83d at character 6"),
    ("nul-character", '{"input": "a\\u0000b", "output": "c"}\n', 1,
     "field 'input': contains the control character U+0000 at character 1"),
    ("raw-escape-character", '{"input": "a\x1b[31mred", "output": "c"}\n', 1,
     "field 'input': contains the control character U+001B"),
    ("control-in-system", '{"system": "s\\u0007", "input": "a", "output": "c"}\n', 1,
     "field 'system': contains the control character U+0007"),
    ("not-an-object", f'{GOOD}\n["a list"]\n', 2, "field '<record>': must be a JSON object, got list"),
    ("null-record", "null\n", 1, "field '<record>': must be a JSON object, got NoneType"),
    ("string-record", '"just text"\n', 1, "field '<record>': must be a JSON object, got str"),
    ("messages-not-list", f'{line({"messages": "hi"})}\n', 1, "field 'messages': must be a non-empty list"),
    ("messages-empty", f'{line({"messages": []})}\n', 1, "field 'messages': must be a non-empty list"),
    ("message-without-content", f'{line({"messages": [{"role": "user"}]})}\n', 1,
     "field 'messages[0]': must be an object with exactly 'role' and 'content'"),
    ("sharegpt-message", f'{line({"messages": [{"from": "human", "value": "hi"}]})}\n', 1,
     "'from'/'value' are written 'role'/'content'"),
    ("role-human", msgs(("human", "hi"), ("assistant", "hello")) + "\n", 1,
     "field 'messages[0].role': is 'human', expected 'user' (system first, then user and assistant alternating; "
     "roles are system, user, assistant)"),
    ("two-users", msgs(("user", "a"), ("user", "b"), ("assistant", "c")) + "\n", 1,
     "field 'messages[1].role': is 'user', expected 'assistant'"),
    ("system-in-the-middle", msgs(("user", "a"), ("system", "s"), ("assistant", "c")) + "\n", 1,
     "field 'messages[1].role': is 'system', expected 'assistant'"),
    ("ends-with-user", msgs(("user", "a"), ("assistant", "b"), ("user", "c")) + "\n", 1,
     "field 'messages': must end with an assistant message"),
    ("empty-content", msgs(("user", "a"), ("assistant", "")) + "\n", 1, "field 'messages[1].content': is empty"),
    ("content-not-text", line({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]})
     + "\n", 1, "field 'messages[0].content': must be a string, got int"),
    ("field-next-to-messages", line({**MULTI, "id": 7}) + "\n", 1, "field 'id': unknown field next to 'messages'"),
    ("empty-file", "", 0, "is empty (0 bytes): expected one JSON record per line"),
    ("blank-lines-only", "\n  \n\n", 0, "contains only blank lines"),
    ("json-array-file", json.dumps([json.loads(GOOD), json.loads(GOOD)], ensure_ascii=False, indent=2), 1,
     "is one JSON document, not JSON Lines"),
    ("pretty-printed-object", json.dumps(json.loads(GOOD), ensure_ascii=False, indent=2), 1,
     "is one JSON document, not JSON Lines"),
]
# Files whose BYTES are the problem: (id, bytes, line, text)
BYTE_CASES = [
    ("gbk", (GOOD + "\n").encode("utf-8") + line({"input": "你好", "output": "我在"}).encode("gbk") + b"\n", 2,
     "not UTF-8: byte b'\\xc4' at byte offset 11 of the line"),
    ("gbk-fix-named", line({"input": "心情不好", "output": "慢慢说"}).encode("gbk") + b"\n", 1,
     "it reads as GBK/GB18030 (Chinese Windows); convert it once: iconv -f GB18030 -t UTF-8"),
    ("latin-1", '{"input": "caf\xe9 ", "output": "ok"}\n'.encode("latin-1"), 1, "not UTF-8: byte b'\\xe9'"),
    ("utf-16", ("\ufeff" + GOOD + "\n").encode("utf-16-le"), 0, "is UTF-16 (Notepad's 'Unicode'); save it as UTF-8"),
]


def data_file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


def located(message: str, path: Path, lineno: int) -> bool:
    return f"{path}:{lineno}: " in message if lineno else f"{path}: " in message


ALL_DATA = [pytest.param(c, lno, text, id=i) for i, c, lno, text in DATA_CASES + BYTE_CASES]


@pytest.mark.parametrize("content, lineno, text", ALL_DATA)
def test_data_file_through_load_records(tmp_path, content, lineno, text):
    path = data_file(tmp_path, content)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert located(message, path, lineno) and text in message, message
    assert sorted(tmp_path.iterdir()) == before


@pytest.fixture
def run_dirs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A private work directory and model cache for ``python -m glmlora.train`` run in this process."""
    work, models = tmp_path / "work", tmp_path / "models"
    monkeypatch.setenv("GLMLORA_WORKDIR", str(work))
    monkeypatch.setenv("GLMLORA_MODEL_CACHE", str(models))
    monkeypatch.setenv("GLMLORA_PROFILE", "tiny")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return work, models


def run_main(config: Path, capsys) -> tuple[int, str]:
    status = main(["--config", str(config)])
    captured = capsys.readouterr()
    return status, captured.err


def assert_nothing_written(work: Path, models: Path) -> None:
    """No split, run, adapter or model: the work directory (made by merely choosing the profile) stays empty."""
    assert not models.exists()
    assert not work.exists() or list(work.rglob("*")) == []


@pytest.mark.parametrize("content, lineno, text", ALL_DATA)
def test_data_file_through_the_training_command(tmp_path, run_dirs, capsys, content, lineno, text):
    path = data_file(tmp_path, content)
    config = tmp_path / "train.yaml"
    config.write_text(f"profile: tiny\ndata: {path}\n")
    status, err = run_main(config, capsys)
    assert status == 2 and err.startswith("data error: ") and "Traceback" not in err
    assert located(err, path, lineno) and text in err, err
    assert_nothing_written(*run_dirs)


# ---------------------------------------------------------------------------------------------- YAML configs
# (id, YAML text ({tmp} = a private directory), line named, text). Each would otherwise crash late or train wrong.
CONFIG_CASES = [
    ("unknown-top-key", "epochs: 3\n", 1, "unknown key 'epochs' in the top level; known keys: adapter_dir"),
    ("unknown-lora-key", "lora:\n  rank: 4\n", 2, "unknown key 'lora.rank' in section 'lora'; known keys: alpha"),
    ("typo-training-key", "training:\n  learnin_rate: 0.1\n", 2, "(did you mean 'learning_rate'?)"),
    ("r-not-a-number", "lora:\n  r: eight\n", 2, "key 'lora.r' must be a valid integer, got str 'eight'"),
    ("r-zero", "lora:\n  r: 0\n", 2, "key 'lora.r' must be greater than or equal to 1, got int 0"),
    ("dropout-two", "lora:\n  dropout: 2.0\n", 2, "key 'lora.dropout' must be less than 1, got float 2.0"),
    ("dropout-negative", "lora:\n  dropout: -0.1\n", 2, "key 'lora.dropout' must be greater than or equal to 0"),
    ("alpha-zero", "lora:\n  alpha: 0\n", 2, "key 'lora.alpha' must be greater than 0"),
    ("targets-a-string", "lora:\n  target_modules: q_proj\n", 2, "key 'lora.target_modules' must be a valid list"),
    ("targets-original-names", "lora:\n  target_modules: [query_key_value]\n", 2,
     "section 'lora': unknown target module(s) ['query_key_value'] (original ChatGLM3 names?"),
    ("targets-empty", "lora:\n  target_modules: []\n", 2, "key 'lora.target_modules' must be a non-empty list"),
    ("lr-negative", "training:\n  learning_rate: -0.1\n", 2, "key 'training.learning_rate' must be greater than 0"),
    ("lr-zero", "training:\n  learning_rate: 0\n", 2, "key 'training.learning_rate' must be greater than 0"),
    ("lr-text", "training:\n  learning_rate: fast\n", 2, "key 'training.learning_rate' must be a valid number"),
    ("batch-zero", "training:\n  per_device_train_batch_size: 0\n", 2,
     "key 'training.per_device_train_batch_size' must be greater than or equal to 1"),
    ("accumulation-zero", "training:\n  gradient_accumulation_steps: 0\n", 2,
     "key 'training.gradient_accumulation_steps' must be greater than or equal to 1"),
    ("batch-float", "training:\n  per_device_train_batch_size: 2.5\n", 2, "must be a valid integer, got float 2.5"),
    ("max-steps-negative", "training:\n  max_steps: -5\n", 2,
     "key 'training.max_steps' must be a positive number of optimizer steps, or -1"),
    ("max-steps-zero", "training:\n  max_steps: 0\n", 2, "key 'training.max_steps' must be a positive number"),
    ("epochs-zero", "training:\n  num_train_epochs: 0\n", 2,
     "key 'training.num_train_epochs' is 0.0 and max_steps is not set: nothing would be trained"),
    ("epochs-negative", "training:\n  num_train_epochs: -1\n", 2,
     "key 'training.num_train_epochs' must be greater than or equal to 0"),
    ("save-steps-zero", "training:\n  save_steps: 0\n", 2,
     "key 'training.save_steps' must be a whole number of steps >= 1, or a fraction of the run between 0 and 1"),
    ("save-steps-one-and-a-half", "training:\n  save_steps: 1.5\n", 2, "key 'training.save_steps' must be a whole"),
    ("logging-steps-negative", "training:\n  logging_steps: -1\n", 2, "key 'training.logging_steps' must be"),
    ("eval-steps-zero", "training:\n  eval_steps: 0\n", 2, "key 'training.eval_steps' must be a whole number"),
    ("scheduler-typo", "training:\n  lr_scheduler_type: cosin\n", 2,
     "key 'training.lr_scheduler_type' must be 'linear', 'cosine',"),
    ("optimizer-typo", "training:\n  optim: adam\n", 2, "key 'training.optim' must be 'adamw_torch',"),
    ("bool-as-number", "training:\n  gradient_checkpointing: 1\n", 2,
     "key 'training.gradient_checkpointing' must be a valid boolean, got int 1"),
    ("seed-negative", "training:\n  seed: -1\n", 2, "key 'training.seed' must be greater than or equal to 0"),
    ("warmup-negative", "training:\n  warmup_steps: -0.1\n", 2, "key 'training.warmup_steps' must be greater"),
    ("weight-decay-negative", "training:\n  weight_decay: -0.01\n", 2, "key 'training.weight_decay' must be greater"),
    ("keep-zero-checkpoints", "training:\n  save_total_limit: 0\n", 2, "key 'training.save_total_limit' must be"),
    ("report-to-not-installed", "training:\n  report_to: wandb\n", 2,
     "key 'training.report_to' names wandb, which is not installed: pip install wandb, or set report_to: none"),
    ("report-to-unknown", "training:\n  report_to: [wandbb]\n", 2,
     "key 'training.report_to' has unknown integration(s) ['wandbb']"),
    ("output-dir-in-training", "training:\n  output_dir: x\n", 2,
     "key 'training.output_dir' is set by the top-level key 'output_dir' instead"),
    ("resume-in-training", "training:\n  resume_from_checkpoint: x\n", 2,
     "key 'training.resume_from_checkpoint' is set by the top-level key 'resume' instead"),
    ("output-dir-is-a-file", "output_dir: {tmp}/a_file\n", 1, "key 'output_dir': {tmp}/a_file is a file"),
    ("adapter-dir-is-a-file", "adapter_dir: {tmp}/a_file\n", 1, "key 'adapter_dir': {tmp}/a_file is a file"),
    ("adapter-dir-under-a-file", "adapter_dir: {tmp}/a_file/adapter\n", 1,
     "key 'adapter_dir': {tmp}/a_file/adapter cannot be created: {tmp}/a_file is a file"),
    ("data-missing", "data: {tmp}/nope.jsonl\n", 1, "key 'data': no file {tmp}/nope.jsonl"),
    ("data-a-directory", "data: {tmp}\n", 1, "key 'data': {tmp} is a directory, not a file"),
    ("profile-unknown", "profile: huge\n", 1, "key 'profile' must be 'auto', 'tiny', 'full' or 'full-random'"),
    ("max-length-tiny", "max_length: 8\n", 1, "key 'max_length' must be greater than or equal to 16"),
    ("max-length-over-pack", "max_length: 2048\npack_tokens: 1024\n", 1,
     "key 'max_length' (2048) must not exceed 'pack_tokens' (1024)"),
    ("pack-tokens-float", "pack_tokens: 1.5\n", 1, "key 'pack_tokens' must be a valid integer, got float 1.5"),
    ("speed-ups-text", "speed_ups: maybe\n", 1, "key 'speed_ups' must be a valid boolean"),
    ("four-bit-number", "load_in_4bit: 1\n", 1, "key 'load_in_4bit' must be a valid boolean, got int 1"),
    ("checkpoint-every-zero", "checkpoint_every: 0\n", 1, "key 'checkpoint_every' must be greater than or equal to 1"),
    ("resume-empty", "resume: ''\n", 1, "key 'resume' must be non-empty text"),
    ("resume-not-a-checkpoint", "resume: {tmp}\n", 1, "key 'resume': {tmp} cannot be resumed from: no trainer_state"),
    ("resume-missing", "resume: {tmp}/gone\n", 1, "key 'resume': {tmp}/gone cannot be resumed from: not a directory"),
    ("section-twice", "lora:\n  r: 8\nlora:\n  r: 4\n", 3,
     "key 'lora' is written twice (also on line 1); YAML would silently keep only the last one"),
    ("key-twice", "training:\n  max_steps: 5\n  max_steps: 50\n", 3, "key 'training.max_steps' is written twice"),
    ("tab-indent", "training:\n\tmax_steps: 5\n", 2, "not valid YAML (found character '\\t'"),
    ("unclosed-bracket", "lora: {r: 8\n", 2, "not valid YAML"),
    ("list-at-top", "- a\n- b\n", 0, "the top level must be a mapping"),
    ("section-a-list", "lora: [1, 2]\n", 1, "key 'lora' must be a valid dictionary, got list"),
    ("section-a-number", "training: 5\n", 1, "key 'training' must be a valid dictionary, got int 5"),
]


@pytest.mark.parametrize("text, lineno, expected", [pytest.param(*c[1:], id=c[0]) for c in CONFIG_CASES])
def test_training_config(tmp_path, run_dirs, capsys, text, lineno, expected):
    (tmp_path / "a_file").write_text("not a directory")
    config = tmp_path / "train.yaml"
    config.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    status, err = run_main(config, capsys)
    assert status == 2 and err.startswith("config error: ") and "Traceback" not in err, err
    assert located(err, config, lineno) and expected.replace("{tmp}", str(tmp_path)) in err, err
    assert_nothing_written(*run_dirs)


@pytest.mark.parametrize("make, expected", [
    pytest.param(lambda p: p.write_bytes("training:\n  max_steps: 5 # 五步\n".encode("gbk")),
                 "{cfg}:2: not UTF-8: byte b'\\xce' at byte offset 17 of the line", id="gbk-config"),
    pytest.param(lambda p: None, "{cfg}: no such config file", id="config-missing"),
    pytest.param(lambda p: p.mkdir(), "{cfg}: is not a file", id="config-a-directory"),
])
def test_training_config_file(tmp_path, run_dirs, capsys, make, expected):
    config = tmp_path / "train.yaml"
    make(config)
    status, err = run_main(config, capsys)
    assert status == 2 and expected.replace("{cfg}", str(config)) in err and "Traceback" not in err, err
    assert_nothing_written(*run_dirs)


# ---------------------------------------------------------------------------------------------- model directories
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def edit_config(**changes):
    def edit(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            cfg.pop(key)
        (src / "config.json").write_text(json.dumps(cfg))
    return edit


def edit_shard(name: str, change):
    def edit(src: Path) -> None:
        tensors = load_file(src / name)
        change(tensors)
        save_file(tensors, src / name)
    return edit


def to_bin_truncated(src: Path) -> None:
    """The checkpoint as .bin shards (the real ChatGLM3 layout) with the second one cut in half."""
    weight_map = {}
    for i, name in enumerate((SHARD1, SHARD2)):
        tensors = load_file(src / name)
        (src / name).unlink()
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(tensors, src / shard)
        weight_map.update({k: shard for k in tensors})
    (src / "model.safetensors.index.json").unlink()
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    data = (src / "pytorch_model-00002-of-00002.bin").read_bytes()
    (src / "pytorch_model-00002-of-00002.bin").write_bytes(data[:len(data) // 2])


# (id, how to break a copy of the tiny original checkpoint, file named, text)
MODEL_CASES = [
    ("no-config", lambda s: (s / "config.json").unlink(), "", "no config.json (is this a model directory?)"),
    ("config-bad-json", lambda s: (s / "config.json").write_text('{"model_type": "chatglm",\n}'), "config.json",
     "line 2: not valid JSON"),
    ("config-a-list", lambda s: (s / "config.json").write_text("[]"), "config.json", "must be a JSON object"),
    ("config-not-utf8", lambda s: (s / "config.json").write_bytes('{"五": 1}'.encode("gbk")), "config.json",
     "not UTF-8"),
    ("model-type-llama", edit_config(model_type="llama"), "config.json", "field 'model_type' is 'llama'"),
    ("missing-hidden-size", edit_config(hidden_size=None), "config.json", "missing field(s) hidden_size"),
    ("hidden-size-text", edit_config(hidden_size="64"), "config.json",
     "field 'hidden_size' must be a positive integer, got '64'"),
    ("zero-layers", edit_config(num_layers=0), "config.json", "field 'num_layers' must be a positive integer"),
    ("p-tuning", edit_config(pre_seq_len=128), "config.json", "field 'pre_seq_len' = 128 (P-tuning v2"),
    ("quantized", edit_config(quantization_bit=4), "config.json", "field 'quantization_bit' = 4"),
    ("vocab-too-small", edit_config(padded_vocab_size=64), "tokenizer.model",
     "do not fit the 64 embedding rows of config.json's 'padded_vocab_size'"),
    ("no-tokenizer", lambda s: (s / "tokenizer.model").unlink(), "", "missing tokenizer file 'tokenizer.model'"),
    ("tokenizer-garbage", lambda s: (s / "tokenizer.model").write_bytes(b"<html>404 Not Found</html>"),
     "tokenizer.model", "not a readable sentencepiece model"),
    ("zero-byte-shard", lambda s: (s / SHARD2).write_bytes(b""), SHARD2, "empty file (0 bytes)"),
    ("truncated-shard", lambda s: (s / SHARD2).write_bytes((s / SHARD2).read_bytes()[:-100]), SHARD2,
     "not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    ("corrupt-header", lambda s: (s / SHARD1).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
     SHARD1, "not a readable safetensors file"),
    ("html-instead-of-shard", lambda s: (s / SHARD1).write_bytes(b"<!DOCTYPE html><html>rate limited</html>"),
     SHARD1, "not a readable safetensors file"),
    ("shard-missing", lambda s: (s / SHARD2).unlink(), "model.safetensors.index.json",
     f"lists shard(s) that are not in {{src}}: {SHARD2}"),
    ("index-bad-json", lambda s: (s / "model.safetensors.index.json").write_text("{"),
     "model.safetensors.index.json", "not valid JSON"),
    ("index-empty-map", lambda s: (s / "model.safetensors.index.json").write_text('{"weight_map": {}}'),
     "model.safetensors.index.json", "field 'weight_map' is missing, empty"),
    ("no-weights", lambda s: [p.unlink() for p in s.glob("model*")], "", "no weights found"),
    ("shape-mismatch", edit_config(ffn_hidden_size=72), SHARD1, "has shape"),
    ("unknown-weight", edit_shard(SHARD2, lambda t: t.update(
        {"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)})), SHARD2,
     "unknown weight 'transformer.prefix_encoder.embedding.weight'"),
    ("missing-weights", edit_shard(SHARD2, lambda t: [t.pop(k) for k in [k for k in t if "final_layernorm" in k]]),
     "", "the checkpoint lacks 1 weight(s), e.g. model.norm.weight"),
    ("truncated-bin-shard", to_bin_truncated, "pytorch_model-00002-of-00002.bin",
     "not a readable PyTorch checkpoint"),
]


@pytest.mark.parametrize("edit, named, text", [pytest.param(*c[1:], id=c[0]) for c in MODEL_CASES])
def test_model_directory(tiny_original, tmp_path, edit, named, text):
    src = copy_checkpoint(tiny_original, tmp_path / "chatglm3")
    edit(src)
    with pytest.raises(ConversionError) as info:
        glmlora.load(src)
    message = str(info.value)
    assert message.startswith(f"{src / named}:" if named else f"{src}:"), message
    assert text.replace("{src}", str(src)) in message, message
    out = native_dir_for(src)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()  # nothing written


def test_a_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ConversionError, match=f"{tmp_path / 'nowhere'}: no such model directory"):
        glmlora.load(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- checkpoints
def complete_checkpoint(path: Path, step: int) -> Path:
    """The files Trainer writes for a LoRA checkpoint, tiny but real."""
    path.mkdir(parents=True)
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINT_CASES = [
    ("empty", lambda c: [p.unlink() for p in c.iterdir()], "empty (the run stopped while creating it)"),
    ("no-trainer-state", lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json (the run stopped"),
    ("half-trainer-state", lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is unreadable"),
    ("truncated-adapter", lambda c: truncate(c / "adapter_model.safetensors"),
     "adapter_model.safetensors: not a readable safetensors file"),
    ("no-adapter", lambda c: (c / "adapter_model.safetensors").unlink(), "no weights"),
    ("no-adapter-config", lambda c: (c / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    ("truncated-optimizer", lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated or corrupt"),
]


@pytest.mark.parametrize("damage, reason", [pytest.param(*c[1:], id=c[0]) for c in CHECKPOINT_CASES])
def test_resume_auto_passes_over_an_incomplete_checkpoint(tmp_path, damage, reason):
    complete_checkpoint(tmp_path / "checkpoint-2", 2)
    newest = complete_checkpoint(tmp_path / "checkpoint-4", 4)
    damage(newest)
    said: list[str] = []
    assert last_checkpoint(tmp_path, say=said.append) == str(tmp_path / "checkpoint-2")
    assert len(said) == 1 and said[0].startswith(f"skipping {newest}: {reason}"), said


def test_resume_auto_with_only_broken_checkpoints_starts_again(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    said: list[str] = []
    assert last_checkpoint(tmp_path, say=said.append) is None and len(said) == 1
