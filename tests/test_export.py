"""Exports: the merged directory plain transformers loads, and the original layout ChatGLM3's own code needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmlora.chatglm3 import ConversionError, convert_checkpoint, read_shard, weight_files
from glmlora.export import (EXPORT_MARKER, export_merged, export_merged_original, export_original, missing_files,
                            required_files, source_dir)

from conftest import copy_checkpoint, plain_transformers_logits

AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
# Stand-ins for the model authors' files (never executed): the imports are what decides what is needed.
CODE = {
    "configuration_chatglm.py": "class ChatGLMConfig:\n    pass\n",
    "modeling_chatglm.py": "from .configuration_chatglm import ChatGLMConfig\n\n\ndef quantize(model, bits):\n"
                           "    from .quantization import quantize\n    return quantize(model, bits)\n",
    "quantization.py": "def quantize(model, bits):\n    return model\n",
    "tokenization_chatglm.py": "class ChatGLMTokenizer:\n    pass\n",
}


def fake_download(tiny_original: Path, dst: Path) -> Path:
    """The tiny checkpoint dressed as a real download: code files, auto_map, tokenizer_config, licence."""
    src = copy_checkpoint(tiny_original, dst)
    config = json.loads((src / "config.json").read_text())
    config.update({"auto_map": AUTO_MAP, "transformers_version": "4.30.2", "_name_or_path": "THUDM/chatglm3-6b"})
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "remove_space": False,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    for name, text in CODE.items():
        (src / name).write_text(text)
    (src / "MODEL_LICENSE").write_text("The model authors' licence.\n")
    return src


def test_merged_export_loads_with_plain_transformers(memorised, tmp_path):
    model, tok, *_ = memorised
    ids = torch.arange(3, 30).view(1, -1)
    with torch.no_grad():
        want = model(ids).logits
    out = export_merged(model, tok, tmp_path / "merged")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.stop_ids
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.safetensors")) and source_dir(out) is not None  # it remembers its download
    assert (plain_transformers_logits(out, ids, tmp_path) - want).abs().max().item() < 1e-4


def test_export_original_takes_the_download_along(tiny_original, tiny_state, tmp_path, capsys):
    src = fake_download(tiny_original, tmp_path / "download")
    native = convert_checkpoint(src, tmp_path / "native", progress=False).out_dir
    capsys.readouterr()
    out = export_original(native, tmp_path / "orig")
    source, exported = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key, value in source.items():  # key by key: every field of the download's config, same value
        assert exported.get(key) == value, key
    assert exported["use_cache"] is True and exported["auto_map"] == AUTO_MAP
    needed = required_files(out)
    assert {"config.json", "tokenizer.model", "tokenizer_config.json", *CODE} <= set(needed)
    assert missing_files(out) == [] and "note:" not in capsys.readouterr().out
    for name in [*CODE, "tokenizer.model", "tokenizer_config.json", "MODEL_LICENSE"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    weights = {k: v for f in weight_files(out) for k, v in read_shard(f).items()}
    assert all(torch.equal(weights[k], v) for k, v in tiny_state.items() if not k.endswith("inv_freq"))


def test_export_without_code_files_says_what_is_missing(tiny_original, tmp_path, capsys):
    native = convert_checkpoint(copy_checkpoint(tiny_original, tmp_path / "m"), tmp_path / "native",
                                progress=False).out_dir
    capsys.readouterr()
    out = export_original(native, tmp_path / "orig")
    note = capsys.readouterr().out
    assert "tokenizer_config.json" in note and "'auto_map' in config.json" in note and "does not ship" in note
    assert missing_files(out) == ["tokenizer_config.json", "'auto_map' in config.json"]
    source = json.loads((tiny_original / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert all(exported[k] == v for k, v in source.items())  # every key of the tiny config, use_cache included


def test_without_a_known_download_the_note_asks_for_it(tiny_original, tmp_path, capsys):
    native = convert_checkpoint(copy_checkpoint(tiny_original, tmp_path / "m"), tmp_path / "native",
                                progress=False).out_dir
    marker = json.loads((native / "glmlora_conversion.json").read_text())
    marker["source"] = str(tmp_path / "deleted-download")
    (native / "glmlora_conversion.json").write_text(json.dumps(marker))
    capsys.readouterr()
    out = export_original(native, tmp_path / "orig")
    assert "pass source=" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_merged_original_export_uses_the_download_the_model_came_from(memorised, tiny_original, tmp_path, capsys):
    model, tok, *_ = memorised
    src = fake_download(tiny_original, tmp_path / "download")
    out = export_merged_original(model, tok, tmp_path / "orig", source=src)
    keys = {k for f in weight_files(out) for k in read_shard(f)}
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in keys
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "chatglm" and exported["auto_map"] == AUTO_MAP
    assert missing_files(out) == [] and exported["torch_dtype"] == "float32"  # the merged weights' dtype
    assert json.loads((tmp_path / "orig-native" / EXPORT_MARKER).read_text())["source"] is not None


def test_a_download_of_another_model_is_refused(tiny_original, tmp_path):
    other = fake_download(tiny_original, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    native = convert_checkpoint(copy_checkpoint(tiny_original, tmp_path / "m"), tmp_path / "native",
                                progress=False).out_dir
    with pytest.raises(ConversionError, match="'hidden_size'"):
        export_original(native, tmp_path / "orig", source=other)


def test_required_files_follow_auto_map_and_relative_imports(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": AUTO_MAP}))
    (tmp_path / "modeling_chatglm.py").write_text(CODE["modeling_chatglm.py"])
    assert required_files(tmp_path) == ["config.json", "tokenizer.model", "tokenizer_config.json",
                                        "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py"]
    assert {"configuration_chatglm.py", "quantization.py", "the weights"} <= set(missing_files(tmp_path))
