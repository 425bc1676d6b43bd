"""The sync-free decode loop: same ids as transformers' generate, same sampling filters, chunks, limits."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import StaticCache
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from glmlora.decoding import decode, decode_steps, filtered_logits, sample_next

T = torch.tensor


def _prompts(tok, texts):
    rows = [{"input_ids": tok.build_conversation([{"role": "user", "content": t}], add_generation_prompt=True)}
            for t in texts]
    return tok.pad(rows, padding_side="left", return_tensors="pt")


def _decode(model, tok, enc, new=40, context=256, compile=False, **kw):
    cache = StaticCache(config=model.config, max_cache_len=context)
    return decode(model, cache, enc["input_ids"], enc["attention_mask"], max_new_tokens=new,
                  stop_ids=tok.stop_ids, pad_id=tok.pad_token_id, compile=compile, **kw)


def _until_stop(ids, stops):
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids) - 1)
    return ids[:cut + 1]


@pytest.mark.parametrize("check_every", [1, 8])
def test_greedy_ids_equal_generate_for_left_padded_rows(memorised, check_every):
    model, tok, records, *_ = memorised
    enc = _prompts(tok, [records[0]["input"], "random words " * 9, "我最近总是很累", records[3]["input"]])
    ours = _decode(model, tok, enc, check_every=check_every)
    ref = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=0)
    ref = ref[:, enc["input_ids"].shape[1]:]
    for row in range(4):
        expected = _until_stop(ref[row].tolist(), tok.stop_ids)
        assert _until_stop(ours[row].tolist(), tok.stop_ids) == expected
        assert set(ours[row, len(expected):].tolist()) <= {tok.pad_token_id}  # nothing after the stop
    answered = _decode(model, tok, _prompts(tok, [records[0]["input"], records[3]["input"]]), new=200,
                       check_every=check_every)
    assert answered.shape[1] < 200  # both memorised answers end on a stop id, so the loop ended early


def test_filters_equal_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    for temperature, top_p, top_k in [(0.8, 0.8, 50), (1.0, 0.3, 0), (0.5, 1.0, 7), (2.0, 0.95, 500)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        ref = TopPLogitsWarper(top_p)(None, ref)
        ours = filtered_logits(logits, T(temperature), T(top_p), top_k)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_exponential_race_draws_from_the_filtered_distribution():
    logits = torch.log(T([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    noise = torch.empty(n, 5).exponential_(generator=gen)
    draws = sample_next(logits.expand(n, 5), noise, T(1.0), T(0.85), 0)
    freq = torch.bincount(draws, minlength=5) / n
    # top-p 0.85 keeps 0.5, 0.25, 0.15 (the smallest set whose mass reaches 0.85), renormalised by 0.9
    expected = T([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert (freq - expected).abs().max() < 0.01 and freq[3:].sum() == 0
    assert sample_next(logits, None, T(1.0), T(0.85), 0).tolist() == [0]


def test_sampling_is_seeded_and_settings_matter(memorised):
    model, tok, *_ = memorised
    enc = _prompts(tok, ["random words"])
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(_decode(model, tok, enc, new=12, do_sample=True, temperature=5.0, top_p=1.0, top_k=0).tolist())
    assert runs[0] == runs[1] != runs[2]
    torch.manual_seed(0)
    nearly_greedy = _decode(model, tok, enc, new=12, do_sample=True, temperature=1.0, top_p=1.0, top_k=1)
    assert nearly_greedy.tolist() == _decode(model, tok, enc, new=12).tolist()


def test_steps_yield_the_first_rows_ids_in_chunks_up_to_the_stop(memorised):
    model, tok, records, *_ = memorised
    enc = _prompts(tok, [records[0]["input"]])
    cache = StaticCache(config=model.config, max_cache_len=256)
    steps = decode_steps(model, cache, enc["input_ids"], enc["attention_mask"], max_new_tokens=200,
                         stop_ids=tok.stop_ids, pad_id=tok.pad_token_id, check_every=4, compile=False)
    chunks = []
    while True:
        try:
            chunks.append(next(steps))
        except StopIteration as done:
            ids = done.value[0].tolist()
            break
    streamed = [t for chunk in chunks for t in chunk]
    assert streamed == _until_stop(ids, tok.stop_ids) and streamed[-1] in tok.stop_ids
    assert all(len(chunk) <= 4 for chunk in chunks) and len(chunks) > 2


def test_prompt_and_new_tokens_must_fit_the_cache(memorised):
    model, tok, *_ = memorised
    enc = _prompts(tok, ["a question " * 20])
    with pytest.raises(ValueError, match="exceed the static cache of 64 tokens"):
        _decode(model, tok, enc, new=40, context=64)


def _lora_model(tiny_original):
    """The tiny model in fp32 with a LoRA adapter whose B is not zero (so switching it off changes the ids)."""
    from peft import get_peft_model

    from glmlora.chatglm3 import ensure_native, load_model
    from glmlora.lora import lora_config
    from glmlora.tokenizer import load_tokenizer

    native = ensure_native(tiny_original)
    model = get_peft_model(load_model(native, dtype=torch.float32), lora_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model, load_tokenizer(native)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on the CPU")
def test_compiled_step_equals_the_eager_loop_for_a_peft_model_adapter_on_and_off(tiny_original):
    """The CPU stand-in for the CUDA path: torch.compile of step + sampling changes no id, with LoRA layers in the
    graph and with the adapter switched off (lesson 07's base model)."""
    from glmlora.evaluation import adapter_off

    model, tok = _lora_model(tiny_original)
    enc = _prompts(tok, ["你好 random words", "another question here"])
    runs = {}
    for adapter in (True, False):
        with adapter_off(model) if not adapter else torch.no_grad():
            for compiled in (False, True):
                runs[adapter, compiled] = _decode(model, tok, enc, new=16, context=128, compile=compiled)
    assert torch.equal(runs[True, False], runs[True, True]) and torch.equal(runs[False, False], runs[False, True])
    assert not torch.equal(runs[True, False], runs[False, False])  # the adapter really was off


def test_one_compiled_layer_serves_every_layer_and_every_prompt_length(memorised, monkeypatch):
    """The compiled parts are traced once each, whatever the prompt's length: one layer graph serves all decoder
    layers (their cache tensors are arguments, not ``layer_idx``), and every buffer keeps its shape and strides
    from reply to reply (a stride that followed the prompt length once made every reply compile again)."""
    import torch._dynamo

    from glmlora import decode_step

    model, tok, *_ = memorised
    assert model.config.num_hidden_layers > 1
    graphs: dict[str, int] = {}

    def counting(name):
        def backend(gm, example_inputs):
            graphs[name] = graphs.get(name, 0) + 1
            return gm.forward
        return backend

    torch._dynamo.reset()
    parts = tuple(torch.compile(fn, backend=counting(fn.__name__), dynamic=False)
                  for fn in (decode_step.prologue, decode_step.layer_step, decode_step.epilogue))
    monkeypatch.setitem(decode_step._COMPILED, repr([]), parts)
    for text in ("short", "a much longer question with many more words in it than the first one"):
        _decode(model, tok, _prompts(tok, [text]), new=8, context=128, compile=True)
    torch._dynamo.reset()
    assert graphs == {"prologue": 1, "layer_step": 1, "epilogue": 1}


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: recording runs nothing, each replay runs the recorded step."""

    def __init__(self, step):
        self.step, self.out = step, None

    def replay(self):
        self.out.copy_(self.step.forward())


def test_the_graph_is_captured_once_and_again_when_the_model_changes(tiny_original, monkeypatch):
    """The graph logic of the CUDA path, on the CPU: warm-up calls, one capture reused over replies, a new capture
    after the adapter is switched off or on (a graph reads stale state otherwise), none in training mode."""
    from glmlora import decode_step
    from glmlora.evaluation import adapter_off

    model, tok = _lora_model(tiny_original)

    def capture(step):
        graph = _FakeGraph(step)
        graph.out = step.out = torch.empty(step.tokens.shape[0], dtype=torch.long)
        step.captures += 1
        return graph

    plain = (decode_step.prologue, decode_step.layer_step, decode_step.epilogue)
    monkeypatch.setitem(decode_step._COMPILED, repr([]), plain)
    monkeypatch.setattr(decode_step.DecodeStep, "_warm_up", decode_step.DecodeStep.forward)
    monkeypatch.setattr(decode_step.DecodeStep, "_capture", capture)
    enc = _prompts(tok, ["你好 random words", "another question here"])
    cache = StaticCache(config=model.config, max_cache_len=128)

    def reply(graphs):
        with torch.inference_mode():
            cache.reset()
        ids = decode(model, cache, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                     stop_ids=[], pad_id=tok.pad_token_id, compile=graphs)
        steps = model._glmlora_decode_steps[cache]  # keyed by (sampling, top_k, compile options)
        return ids, next(s for key, s in steps.items() if key[2] is not None) if graphs else None

    with torch.no_grad():
        eager, _ = reply(False)
        graphed, step = reply(True)
    step.graphed = step.use_graph = True  # what a CUDA device sets; the first reply ran without graphs
    step.stamp = None
    with torch.no_grad():
        assert torch.equal(reply(True)[0], eager) and step.captures == 1
        assert torch.equal(reply(True)[0], eager) and step.captures == 1  # replayed, not captured again
        with adapter_off(model):
            off, _ = reply(True)
            assert step.captures == 2 and torch.equal(off, reply(False)[0]) and not torch.equal(off, eager)
        assert torch.equal(reply(True)[0], eager) and step.captures == 3  # adapter back on: captured again
        model.train()
        reply(True)
        assert step.captures == 3  # training mode (dropout): the step runs without a graph
    assert torch.equal(graphed, eager)


def test_a_model_spread_over_devices_gets_no_graph(memorised):
    from glmlora.decode_step import on_one_device

    model, *_ = memorised
    device = model.device
    assert on_one_device(model, device)
    model.model.layers[-1].to("meta")  # stands in for a second GPU: device_map="auto" puts the last layers there
    assert not on_one_device(model, device)
