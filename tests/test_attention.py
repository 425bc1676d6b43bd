"""The grouped one-token attention: the same logits as SDPA, without copying k/v heads, only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache
from transformers.integrations import sdpa_attention

from glmlora import load_model, load_tokenizer
from glmlora.attention import NAME, use_grouped_decode
from glmlora.chatglm3 import ensure_native
from glmlora.decoding import decode


@pytest.fixture()
def model_and_prompts(tiny_original):
    native = ensure_native(tiny_original)
    tok = load_tokenizer(native)
    model = load_model(native).eval()
    rows = [{"input_ids": tok.build_conversation([{"role": "user", "content": t}], add_generation_prompt=True)}
            for t in ["你好", "a longer prompt, so that the first row is left-padded " * 2]]
    return model, tok.pad(rows, padding_side="left", return_tensors="pt")


def _logits_per_step(model, enc, steps=6, context=96):
    """Prefill, then ``steps`` one-token steps on a static cache (fixed next tokens): logits of every step."""
    cache = StaticCache(config=model.config, max_cache_len=context)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full = torch.zeros(ids.shape[0], context, dtype=torch.long)
    full[:, :ids.shape[1]] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        out.append(model(input_ids=ids, attention_mask=full, position_ids=positions, past_key_values=cache).logits)
        for i in range(steps):
            full[:, ids.shape[1] + i] = 1
            positions = positions[:, -1:] + 1
            token = torch.full((ids.shape[0], 1), 100 + i)
            out.append(model(input_ids=token, attention_mask=full, position_ids=positions,
                             past_key_values=cache).logits)
    return out


def test_decode_steps_match_sdpa_without_copying_kv_heads(model_and_prompts, monkeypatch):
    model, enc = model_and_prompts
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # ChatGLM3's grouped heads
    reference = _logits_per_step(model, enc)
    assert use_grouped_decode(model) and model.config._attn_implementation == NAME
    copies = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(x.shape) or real(x, n))
    grouped = _logits_per_step(model, enc)
    torch.testing.assert_close(grouped[0], reference[0], rtol=0, atol=0)  # prefill: SDPA itself
    for ours, ref in zip(grouped[1:], reference[1:]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert len(copies) == 2 * layers  # k and v copied in the prefill only, never in the 6 one-token steps


def test_decode_loop_ids_unchanged(model_and_prompts):
    model, enc = model_and_prompts
    settings = dict(max_new_tokens=24, stop_ids=[], pad_id=0, compile=False, do_sample=False)
    before = decode(model, StaticCache(config=model.config, max_cache_len=96), enc["input_ids"],
                    enc["attention_mask"], **settings)
    use_grouped_decode(model)
    after = decode(model, StaticCache(config=model.config, max_cache_len=96), enc["input_ids"],
                   enc["attention_mask"], **settings)
    assert torch.equal(before, after)


def test_other_attention_left_alone(model_and_prompts):
    model, _ = model_and_prompts
    model.set_attn_implementation("eager")
    assert not use_grouped_decode(model)
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert use_grouped_decode(model) and use_grouped_decode(model)  # idempotent
