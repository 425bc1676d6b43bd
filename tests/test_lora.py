"""LoRA: the config factory, and import of adapters trained on the original remote-code ChatGLM3."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

import glmlora
from glmlora.chatglm3 import ConversionError
from glmlora.lora import ALL_LINEAR_TARGETS, import_original_adapter, lora_config

from reference import forward

MODULES = {"query_key_value": "self_attention", "dense": "self_attention",
           "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}


def original_adapter(path, state, cfg, targets, r=4, alpha=16, seed=0, **extra):
    """A PEFT adapter as the original tutorial saved it, plus the weight deltas it implies."""
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for n in range(cfg["num_layers"]):
        for module in targets:
            name = f"transformer.encoder.layers.{n}.{MODULES[module]}.{module}.weight"
            out_f, in_f = state[name].shape
            a = torch.randn(r, in_f, generator=gen) * 0.1
            b = torch.randn(out_f, r, generator=gen) * 0.1
            key = f"base_model.model.transformer.encoder.layers.{n}.{MODULES[module]}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            deltas[name] = (alpha / r) * b.double() @ a.double()
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.1,
              "target_modules": list(targets), "bias": "none", "base_model_name_or_path": "THUDM/chatglm3-6b",
              **extra}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return deltas


@pytest.mark.parametrize("targets", [["query_key_value"], ["query_key_value", "dense", "dense_h_to_4h",
                                                            "dense_4h_to_h"]])
def test_imported_adapter_equals_fused_lora(tiny_original, tiny_state, tiny_config, tmp_path, targets):
    deltas = original_adapter(tmp_path / "orig", tiny_state, tiny_config, targets)
    native = glmlora.ensure_native(tiny_original)
    out = import_original_adapter(tmp_path / "orig", tmp_path / "native", base_model=native)
    model = PeftModel.from_pretrained(glmlora.load_model(native, dtype=torch.float32), str(out)).eval()
    ids = torch.randint(3, tiny_config["padded_vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits.double()
    want = forward(tiny_state, tiny_config, ids, lora=deltas)
    without = forward(tiny_state, tiny_config, ids)
    assert (want - without).abs().max() > 1e-2  # the adapter really changes the model
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_row_split_is_inferred_without_base_model(tiny_original, tiny_state, tiny_config, tmp_path):
    original_adapter(tmp_path / "orig", tiny_state, tiny_config, ["query_key_value"])
    with_base = import_original_adapter(tmp_path / "orig", tmp_path / "a", base_model=tiny_original)
    inferred = import_original_adapter(tmp_path / "orig", tmp_path / "b")
    from safetensors.torch import load_file
    a, b = load_file(with_base / "adapter_model.safetensors"), load_file(inferred / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,field", [({"bias": "all"}, "bias"), ({"use_dora": True}, "use_dora"),
                                         ({"modules_to_save": ["output_layer"]}, "modules_to_save"),
                                         ({"target_modules": "query_key_value"}, "target_modules"),
                                         ({"target_modules": ["word_embeddings"]}, "target_modules"),
                                         ({"peft_type": "PREFIX_TUNING"}, "peft_type")])
def test_unconvertible_adapters_name_the_field(tiny_state, tiny_config, tmp_path, extra, field):
    original_adapter(tmp_path / "orig", tiny_state, tiny_config, ["query_key_value"], **extra)
    with pytest.raises(ConversionError, match=f"'{field}'"):
        import_original_adapter(tmp_path / "orig", tmp_path / "out")


def test_unknown_adapter_weight_is_named(tiny_state, tiny_config, tmp_path):
    original_adapter(tmp_path / "orig", tiny_state, tiny_config, ["query_key_value"])
    bad = {"base_model.model.transformer.prefix_encoder.lora_A.weight": torch.zeros(2, 2)}
    save_file(bad, tmp_path / "orig" / "adapter_model.safetensors")
    with pytest.raises(ConversionError, match="prefix_encoder"):
        import_original_adapter(tmp_path / "orig", tmp_path / "out")


def test_missing_adapter_files_are_named(tmp_path):
    with pytest.raises(ConversionError, match="adapter_config.json"):
        import_original_adapter(tmp_path, tmp_path / "out")


def test_lora_config_factory():
    cfg = lora_config()
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.task_type) == (8, 32, 0.1, "CAUSAL_LM")
    assert set(lora_config(target_modules=ALL_LINEAR_TARGETS).target_modules) == set(ALL_LINEAR_TARGETS)
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj"):
        lora_config(target_modules=["query_key_value"])
