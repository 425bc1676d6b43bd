"""Decode-time attention changes: the decode step's grouped one-token attention (same logits as transformers' SDPA
path, no k/v head copies) and one q/k/v matrix product (same logits, parameters and saving untouched, never stale),
each only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache
from transformers.integrations import sdpa_attention

from glmlora import load_model, load_tokenizer
from glmlora.attention import fuse_qkv
from glmlora.chatglm3 import ensure_native
from glmlora.decode_step import DecodeStep
from glmlora.decoding import decode


@pytest.fixture()
def model_and_prompts(tiny_original):
    native = ensure_native(tiny_original)
    tok = load_tokenizer(native)
    model = load_model(native).eval()
    rows = [{"input_ids": tok.build_conversation([{"role": "user", "content": t}], add_generation_prompt=True)}
            for t in ["你好", "a longer prompt, so that the first row is left-padded " * 2]]
    return model, tok.pad(rows, padding_side="left", return_tensors="pt")


def _logits_per_step(model, enc, steps=6, context=96, ours=False):
    """Prefill, then ``steps`` one-token steps on a static cache (fixed next tokens): logits of every step, from
    the model's own forward or (``ours``) from glmlora's decode step with the logits as its result."""
    cache = StaticCache(config=model.config, max_cache_len=context)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full = torch.zeros(ids.shape[0], context, dtype=torch.long)
    full[:, :ids.shape[1]] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        out.append(model(input_ids=ids, attention_mask=full, position_ids=positions, past_key_values=cache).logits)
        step = DecodeStep(model, cache, sampling=False, top_k=0, options=None) if ours else None
        if ours:  # the same step, ending in the logits instead of the sampled ids
            step.parts = step.parts[:2] + (lambda norm, head, hidden, *_: head(norm(hidden)),)
        for i in range(steps):
            full[:, ids.shape[1] + i] = 1
            positions = positions[:, -1:] + 1
            token = torch.full((ids.shape[0], 1), 100 + i)
            if ours:
                step.mask.copy_(full), step.positions.copy_(positions), step.tokens.copy_(token)
                out.append(step())
            else:
                out.append(model(input_ids=token, attention_mask=full, position_ids=positions,
                                 past_key_values=cache).logits)
    return out


def test_decode_step_matches_the_model_without_copying_kv_heads(model_and_prompts, monkeypatch):
    model, enc = model_and_prompts
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # ChatGLM3's grouped heads
    reference = _logits_per_step(model, enc)
    copies = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(x.shape) or real(x, n))
    ours = _logits_per_step(model, enc, ours=True)
    torch.testing.assert_close(ours[0], reference[0], rtol=0, atol=0)  # prefill: transformers' SDPA itself
    for mine, ref in zip(ours[1:], reference[1:]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert len(copies) == 2 * layers  # k and v copied in the prefill only, never in the 6 one-token steps
    assert model.config._attn_implementation == "sdpa"  # the model itself is left as it was


def test_decode_loop_ids_unchanged_by_fusing(model_and_prompts):
    model, enc = model_and_prompts
    settings = dict(max_new_tokens=24, stop_ids=[], pad_id=0, compile=False, do_sample=False)
    before = decode(model, StaticCache(config=model.config, max_cache_len=96), enc["input_ids"],
                    enc["attention_mask"], fused_qkv=False, **settings)
    after = decode(model, StaticCache(config=model.config, max_cache_len=96), enc["input_ids"],
                   enc["attention_mask"], **settings)  # the default: fused q/k/v
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "_FusedLinear"
    assert torch.equal(before, after)


def test_fused_qkv_same_logits_parameters_and_saved_files(model_and_prompts, tmp_path):
    model, enc = model_and_prompts
    ids = enc["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_qkv(model) == model.config.num_hidden_layers and fuse_qkv(model) == model.config.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved").eval()
    assert type(reloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # plain transformers on disk
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_fused_qkv_follows_weight_changes_and_falls_back_out_of_order(model_and_prompts):
    model, enc = model_and_prompts
    fuse_qkv(model)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.v_proj.weight.add_(0.5)  # what an in-place LoRA merge does
        plain = torch.nn.functional.linear
        x = torch.randn(1, 3, attention.q_proj.in_features)
        for part in (attention.q_proj, attention.k_proj, attention.v_proj):  # the order GlmAttention calls them
            torch.testing.assert_close(part(x), plain(x, part.weight, part.bias), rtol=1e-5, atol=1e-5)
        other = torch.randn_like(x)  # k or v on an input q did not just see: its own weight
        torch.testing.assert_close(attention.k_proj(other), plain(other, attention.k_proj.weight,
                                                                  attention.k_proj.bias), rtol=1e-5, atol=1e-5)
        model.to(torch.float64)  # new tensors: the fused copy is rebuilt, in the new dtype
        x = x.double()
        torch.testing.assert_close(attention.q_proj(x), plain(x, attention.q_proj.weight, attention.q_proj.bias))


def test_lora_wrapped_projections_are_left_alone(model_and_prompts):
    from peft import get_peft_model

    from glmlora.lora import lora_config

    model, _ = model_and_prompts
    peft = get_peft_model(model, lora_config())
    assert fuse_qkv(peft) == 0
