"""Conversion of the original ChatGLM3 layout to native GlmForCausalLM, checked against tests/reference.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmlora
from glmlora.chatglm3 import ConversionError, convert_checkpoint, glm_config_from_chatglm, read_shard, weight_files
from glmlora.export import export_original
from glmlora.tokenizer import load_tokenizer

from conftest import copy_checkpoint, plain_transformers_logits
from reference import forward, greedy

TOL = 1e-5  # fp32 against the float64 reference, relative to the largest logit


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


@pytest.fixture(scope="module")
def native_model(tiny_original):
    model = glmlora.load_model(tiny_original, dtype=torch.float32)
    return model.eval()


def test_logits_match_reference_without_padding(native_model, tiny_state, tiny_config):
    ids = torch.randint(0, tiny_config["padded_vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = native_model(ids).logits.double()
    want = forward(tiny_state, tiny_config, ids)
    assert close(got, want)


def test_left_padded_batch_matches_reference_on_real_tokens(native_model, tiny_state, tiny_config):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, tiny_config["padded_vocab_size"], (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :13] = 0
    ids[mask == 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what the original tokenizer returns for left padding
    with torch.no_grad():
        got = native_model(ids, attention_mask=mask, position_ids=pos).logits.double()
    want = forward(tiny_state, tiny_config, ids, mask)
    real = mask.bool()
    assert close(got[real], want[real])


def test_cached_greedy_generation_gives_reference_ids(native_model, tiny_state, tiny_config):
    prompt = list(range(5, 21))
    out = native_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                min_new_tokens=12)
    assert out[0, len(prompt):].tolist() == greedy(tiny_state, tiny_config, prompt, 12)


def test_plain_transformers_loads_the_conversion(tiny_original, native_model, tmp_path):
    """The output directory needs nothing from glmlora: a fresh interpreter loads it with plain transformers."""
    native = glmlora.ensure_native(tiny_original)
    ids = torch.arange(3, 40).view(1, -1)
    plain = plain_transformers_logits(native, ids, tmp_path)
    with torch.no_grad():
        ours = native_model(ids).logits
    assert torch.equal(plain, ours)


def test_conversion_is_reused_and_partial_output_is_not(tiny_original, tmp_path):
    src = copy_checkpoint(tiny_original, tmp_path / "m")
    out = tmp_path / "native"
    (tmp_path / "native.partial").mkdir()
    (tmp_path / "native.partial" / "junk.safetensors").write_text("half written")
    first = convert_checkpoint(src, out, progress=False)
    assert not first.reused and first.shards == 2 and not (tmp_path / "native.partial").exists()
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert stops == load_tokenizer(src).stop_ids
    second = convert_checkpoint(src, out, progress=False)
    assert second.reused and second.parameters == first.parameters
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")  # the source changed
    assert not convert_checkpoint(src, out, progress=False).reused


def test_a_touched_source_is_reused_and_a_changed_one_replaces_only_its_own_files(tiny_original, tmp_path, capsys):
    """Copying or touching a download changes time stamps, not contents: no reconversion. A real change converts
    again, replacing the files the conversion wrote; what the user put next to them stays."""
    import os

    src = copy_checkpoint(tiny_original, tmp_path / "m")
    out = tmp_path / "native"
    convert_checkpoint(src, out, progress=False)
    (out / "my_notes.md").write_text("mine")
    converted = out / "model-00001-of-00002.safetensors"
    before = converted.stat().st_mtime_ns
    shard = src / "model-00001-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touch
    assert convert_checkpoint(src, out, progress=False).reused
    assert converted.stat().st_mtime_ns == before
    assert convert_checkpoint(src, out, progress=False).reused  # the new time stamp was recorded

    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("input_layernorm.weight"))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, shard)  # same size, other contents
    capsys.readouterr()
    assert not convert_checkpoint(src, out, progress=False).reused
    assert "has changed since" in capsys.readouterr().out
    assert (out / "my_notes.md").read_text() == "mine"
    native = name.replace("transformer.encoder.layers", "model.layers")
    merged = {k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert torch.equal(merged[native], tensors[name])
    assert not (tmp_path / "native.partial").exists()


def test_a_failed_conversion_leaves_no_partial_directory(tiny_original, tmp_path):
    src = copy_checkpoint(tiny_original, tmp_path / "m")
    second = src / "model-00002-of-00002.safetensors"
    tensors = load_file(second)
    tensors["transformer.unknown.weight"] = torch.zeros(1)
    save_file(tensors, second)  # readable, so the conversion starts, writes shard 1, then fails on shard 2
    with pytest.raises(ConversionError, match=f"{second}: unknown weight 'transformer.unknown.weight'"):
        convert_checkpoint(src, tmp_path / "native", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bin_shards_convert_like_safetensors(tiny_original, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (src / name).write_bytes((tiny_original / name).read_bytes())
    weight_map = {}
    for i, f in enumerate(weight_files(tiny_original)):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        tensors = read_shard(f)
        torch.save(tensors, src / shard)
        weight_map.update({k: shard for k in tensors})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a = convert_checkpoint(src, tmp_path / "from-bin", progress=False).out_dir
    b = glmlora.ensure_native(tiny_original)
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_export_original_round_trip_is_identical(tiny_original, tiny_state, tmp_path):
    back = export_original(glmlora.ensure_native(tiny_original), tmp_path / "orig")
    again = {}
    for f in weight_files(back):
        again.update(read_shard(f))
    expected = {k: v for k, v in tiny_state.items() if not k.endswith("inv_freq")}
    assert again.keys() == expected.keys()
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    assert json.loads((back / "config.json").read_text())["model_type"] == "chatglm"
    # and the exported copy converts back to the same native model
    assert convert_checkpoint(back, tmp_path / "again", progress=False).parameters > 0


@pytest.mark.parametrize("field,value", [
    ("pre_seq_len", 128), ("quantization_bit", 4), ("rmsnorm", False), ("add_bias_linear", True),
    ("apply_residual_connection_post_layernorm", True), ("post_layer_norm", False)])
def test_unsupported_config_fields_are_named(tiny_config, field, value):
    with pytest.raises(ConversionError, match=f"'{field}'"):
        glm_config_from_chatglm({**tiny_config, field: value})


def test_config_mapping_of_the_real_6b():
    real = {"model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 13696,
            "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
            "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
            "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192}
    c = glm_config_from_chatglm(real)
    assert (c.vocab_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == \
        (65024, 13696, 28, 2, 128)
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.rope_parameters["partial_rotary_factor"] == 0.5
    assert c.eos_token_id == 2 and c.pad_token_id == 0 and c.attention_bias and not c.tie_word_embeddings


def _broken(tiny_original, tmp_path, edit):
    src = copy_checkpoint(tiny_original, tmp_path / "broken")
    edit(src)
    return src


def test_missing_shard_is_named(tiny_original, tmp_path):
    src = _broken(tiny_original, tmp_path, lambda s: (s / "model-00002-of-00002.safetensors").unlink())
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_missing_tokenizer_is_named(tiny_original, tmp_path):
    src = _broken(tiny_original, tmp_path, lambda s: (s / "tokenizer.model").unlink())
    with pytest.raises(ConversionError, match="tokenizer.model"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(src)


def test_shape_contradicting_config_is_named(tiny_original, tmp_path):
    def edit(s):
        cfg = json.loads((s / "config.json").read_text())
        cfg["ffn_hidden_size"] += 8
        (s / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="dense_4h_to_h|down_proj|gate_up_proj"):
        convert_checkpoint(_broken(tiny_original, tmp_path, edit), tmp_path / "out", progress=False)


def test_unknown_key_is_named(tiny_original, tmp_path):
    def edit(s):
        f = s / "model-00001-of-00002.safetensors"
        t = load_file(f)
        t["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
        save_file(t, f)
    with pytest.raises(ConversionError, match="transformer.prefix_encoder.embedding.weight"):
        convert_checkpoint(_broken(tiny_original, tmp_path, edit), tmp_path / "out", progress=False)


def test_foreign_output_directory_is_not_overwritten(tiny_original, tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConversionError, match="not a glmlora conversion"):
        convert_checkpoint(tiny_original, tmp_path / "mine", progress=False)


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type"):
        glmlora.ensure_native(tmp_path)


def test_float64_native_model_equals_reference_to_rounding(tiny_original, tiny_state, tiny_config):
    """In float64 the only gap left is transformers computing rotary angles in fp32 (~1e-7 relative)."""
    model = glmlora.load_model(tiny_original, dtype=torch.float64).eval()
    ids = torch.randint(0, tiny_config["padded_vocab_size"], (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids).logits
    want = forward(tiny_state, tiny_config, ids)
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
