"""Behaviour that a plausible code change could break while every other test still passed (issue 14, item 9).

Each test names the change it catches; each has a control showing that the situation it builds is one in
which that change WOULD show (a model with no stop ids of its own, a prompt whose sampling is not greedy, an
adapter that is not zero, checkpointing that needs input gradients).
"""

from __future__ import annotations

from functools import partial

import torch
from peft import get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from glmlora.chatglm3 import ensure_native, load_model
from glmlora.export import export_merged
from glmlora.generate import GenerationSettings, chat, generate_batch
from glmlora.lora import lora_config
from glmlora.tokenizer import load_tokenizer
from glmlora.training import add_lora

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=200)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_chat_stops_on_the_stop_ids_it_passes_not_on_the_models_generation_config(memorised):
    """Catches: chat / generate_batch no longer passing eos, <|user|>, <|observation|> to generation. Hidden so
    far because the converted model's generation_config.json holds the same ids: here it holds none."""
    model, tok, records, _, convs = memorised
    model.generation_config.eos_token_id = None
    prompts = [c[:-1] for c in convs[:3]]
    ids = torch.tensor([tok.build_conversation(prompts[0], add_generation_prompt=True)])
    control = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                             pad_token_id=0)
    assert control.shape[1] - ids.shape[1] == 60  # without stop ids passed, this model never stops early

    calls = count_forwards(model)
    reply, _ = chat(model, tok, prompts[0][-1]["content"], history=prompts[0][:-1], settings=GREEDY, fast=False)
    assert reply == records[0]["output"].strip() and calls[0] <= len(tok.encode_text(records[0]["output"])) + 8
    calls[0] = 0
    replies = generate_batch(model, tok, prompts, GREEDY, batch_size=3, progress=False, fast=False)
    longest = max(len(tok.encode_text(r["output"])) for r in records[:3])
    assert replies == [r["output"].strip() for r in records[:3]] and calls[0] <= longest + 8


def test_chat_on_the_decode_loop_stops_without_a_generation_config_too(memorised):
    model, tok, records, _, convs = memorised
    model.generation_config.eos_token_id = None
    calls = count_forwards(model)
    prompt = convs[1][:-1]
    reply, _ = chat(model, tok, prompt[-1]["content"], history=prompt[:-1], settings=GREEDY, fast=True,
                    max_context=512)
    assert reply == records[1]["output"].strip()
    assert calls[0] <= len(tok.encode_text(records[1]["output"])) + 40  # stopped within a check_every of 32


def sample(model, tok, settings: GenerationSettings, seed: int, fast: bool) -> str:
    torch.manual_seed(seed)
    return chat(model, tok, "random words about the weather", settings=settings, fast=fast, max_context=512)[0]


def test_temperature_and_top_p_reach_generation_on_both_paths(memorised):
    """Catches: the sampling settings replaced by the defaults (top_p 0.8, temperature 0.8) on the way to
    ``generate`` or the decode loop. A top_p or temperature that leaves one token must sample the greedy reply;
    the defaults do not (the control), so a swap would show."""
    model, tok, *_ = memorised
    greedy = chat(model, tok, "random words about the weather", settings=GenerationSettings(
        do_sample=False, max_new_tokens=24), fast=False)[0]
    narrow_p = GenerationSettings(do_sample=True, top_p=1e-6, temperature=1.0, max_new_tokens=24)
    cold = GenerationSettings(do_sample=True, top_p=1.0, temperature=1e-4, max_new_tokens=24)
    defaults = GenerationSettings(max_new_tokens=24)
    for fast in (False, True):
        assert any(sample(model, tok, defaults, seed, fast) != greedy for seed in range(3))  # control
        for seed in range(3):
            assert sample(model, tok, narrow_p, seed, fast) == greedy
            assert sample(model, tok, cold, seed, fast) == greedy


def test_export_merged_folds_an_unmerged_peft_model(tiny_original, tmp_path):
    """Catches: export_merged saving a PeftModel as it is (an adapter directory, or the base weights alone)."""
    native = ensure_native(tiny_original)
    torch.manual_seed(0)
    model = add_lora(load_model(native, dtype=torch.float32), lora_config(), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make merging a no-op and the test blind
            torch.nn.init.normal_(p, std=0.2)
    ids = torch.arange(3, 40).view(1, -1)
    model.eval()
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (tuned - base).abs().max() > 1e-2  # control: the adapter changes the function

    out = export_merged(model, load_tokenizer(native), tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(ids).logits - tuned).abs().max() < 1e-4


def test_lora_trains_under_reentrant_checkpointing(tiny_original):
    """Re-entrant checkpointing (``gradient_checkpointing_kwargs={"use_reentrant": True}``, older tutorials'
    setting, which Trainer honours by enabling checkpointing again) gives LoRA weights no gradient unless the
    frozen embedding's output requires grad. transformers 5's ``gradient_checkpointing_enable`` turns that on
    itself (for every model whose input is ``input_ids``), so ``add_lora``'s own ``enable_input_require_grads``
    call is redundant: this test holds with or without it, and fails if input grads are lost (the control)."""
    native = ensure_native(tiny_original)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_of(model):
        model.train()
        return model(input_ids=ids, labels=ids).loss

    # control: re-entrant checkpointing switched on below transformers' API, so no input-grad hook is added
    bare = get_peft_model(load_model(native, dtype=torch.float32), lora_config())
    bare.base_model.model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=True))
    assert not loss_of(bare).requires_grad  # nothing to train: the situation this test guards against

    model = add_lora(load_model(native, dtype=torch.float32), lora_config(), gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as Trainer does
    loss_of(model).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
