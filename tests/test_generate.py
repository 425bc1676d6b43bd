"""The chat helper: format, stop ids, history truncation, streaming == non-streaming, batches."""

from __future__ import annotations

import pytest
import torch

from glmlora.generate import (GenerationSettings, chat, conversation, decode_reply, fit_history, generate_batch,
                              split_reply, stream_chat)

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=64)


def test_fit_history_drops_oldest_exchanges_but_keeps_system(memorised):
    _, tok, *_ = memorised
    msgs = [{"role": "system", "content": "系统提示"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"问题{i} " * 5}, {"role": "assistant", "content": f"回答{i} " * 5}]
    msgs.append({"role": "user", "content": "最后的问题"})
    full = len(tok.build_conversation(msgs, add_generation_prompt=True))
    fitted = fit_history(tok, msgs, full - 1)
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1]
    assert fitted[1:] == msgs[3:]  # exactly the oldest user/assistant pair went
    assert fit_history(tok, msgs, full) == msgs
    with pytest.raises(ValueError, match="system message and the new message"):
        fit_history(tok, msgs, 5)


def test_split_reply_separates_the_metadata_line():
    assert split_reply("\n 你好，我在。 ") == ("", "你好，我在。")
    assert split_reply("get_hotline\n {\"country\": \"CN\"}") == ("get_hotline", '{"country": "CN"}')
    assert split_reply("没有元数据行的回答") == ("", "没有元数据行的回答")
    assert split_reply("第一行不是工具名\n第二行") == ("", "第一行不是工具名\n第二行")


def test_decode_reply_cuts_at_the_first_stop_id(memorised):
    _, tok, *_ = memorised
    ids = tok.encode_text("\n") + tok.encode_text("好的") + [tok.role_id("user")] + tok.encode_text("junk")
    assert decode_reply(tok, ids) == "好的"


def test_reply_stops_on_a_stop_id_before_max_new_tokens(memorised):
    model, tok, records, _, convs = memorised
    ids = torch.tensor([tok.build_conversation(convs[0][:-1], add_generation_prompt=True)])
    out = model.generate(ids, max_new_tokens=200, do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] in tok.stop_ids and len(new) < 200


@pytest.mark.parametrize("i", range(3))
def test_streamed_text_equals_the_non_streamed_reply(memorised, i):
    model, tok, records, *_ = memorised
    queries = [records[i]["input"], "Tell me more about sleep.", "我最近总是很累"]
    reply, _ = chat(model, tok, queries[i], settings=GREEDY)
    pieces = list(stream_chat(model, tok, queries[i], settings=GREEDY))
    assert "".join(pieces) == reply and (len(pieces) > 1 or len(reply) < 4)


def test_history_is_returned_and_reused(memorised):
    model, tok, records, *_ = memorised
    reply, history = chat(model, tok, records[0]["input"], system="你是心理咨询助手。", settings=GREEDY)
    assert [m["role"] for m in history] == ["system", "user", "assistant"] and history[-1]["content"] == reply
    _, history2 = chat(model, tok, "谢谢", history=history, system="另一个系统提示", settings=GREEDY)
    assert history2[:3] == history and history2[0]["content"] == "你是心理咨询助手。"
    assert conversation("q", history)[-1] == {"role": "user", "content": "q"}


def test_batched_generation_matches_one_by_one(memorised):
    model, tok, records, _, convs = memorised
    prompts = [c[:-1] for c in convs] + [[{"role": "user", "content": "a much longer question " * 6}]]
    batched = generate_batch(model, tok, prompts, GREEDY, batch_size=4, progress=False)
    single = [chat(model, tok, p[-1]["content"], history=p[:-1], settings=GREEDY)[0] for p in prompts]
    assert batched == single
    assert batched[:len(records)] == [r["output"].strip() for r in records]


def test_sampling_settings_reach_generate(memorised):
    model, tok, records, *_ = memorised
    torch.manual_seed(0)
    a = chat(model, tok, "random words", settings=GenerationSettings(temperature=5.0, top_p=1.0, max_new_tokens=8))
    torch.manual_seed(0)
    b = chat(model, tok, "random words", settings=GenerationSettings(temperature=5.0, top_p=1.0, max_new_tokens=8))
    assert a == b
    assert "top_p" not in GenerationSettings(do_sample=False).kwargs()


def test_static_cache_path_gives_the_same_reply_and_reuses_one_cache(memorised):
    model, tok, records, *_ = memorised
    # The plain references first: the fast path switches the model to grouped attention and fused q/k/v.
    plain, _ = chat(model, tok, records[0]["input"], settings=GREEDY, fast=False)
    plain_again, _ = chat(model, tok, records[1]["input"], settings=GREEDY, fast=False)
    fast, _ = chat(model, tok, records[0]["input"], settings=GREEDY, fast=True, max_context=512)
    cache = model._glmlora_static_caches[(512, 1)]
    again = "".join(stream_chat(model, tok, records[1]["input"], settings=GREEDY, fast=True, max_context=512))
    assert fast == plain and model._glmlora_static_caches[(512, 1)] is cache
    assert again == plain_again


def test_batched_static_cache_path_matches_the_dynamic_one(memorised):
    model, tok, records, _, convs = memorised
    prompts = [c[:-1] for c in convs] + [[{"role": "user", "content": "one more, longer question " * 4}]]
    plain = generate_batch(model, tok, prompts, GREEDY, batch_size=4, progress=False)
    fast = generate_batch(model, tok, prompts, GREEDY, batch_size=4, progress=False, fast=True)
    assert fast == plain and len(fast) == 7  # the last batch of 3 was filled up to 4 and trimmed again


def test_fast_streaming_runs_the_model_in_the_callers_thread(memorised):
    """A CUDA graph captured by torch.compile cannot be replayed from another Python thread (pytorch#123177)."""
    import threading

    model, tok, records, *_ = memorised
    threads = set()
    hook = model.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))
    try:
        pieces = list(stream_chat(model, tok, records[2]["input"], settings=GREEDY, fast=True, max_context=512))
    finally:
        hook.remove()
    assert threads == {threading.get_ident()}
    assert "".join(pieces) == chat(model, tok, records[2]["input"], settings=GREEDY, fast=False)[0]


def test_fast_path_samples_the_same_reply_streamed_or_not(memorised):
    model, tok, *_ = memorised
    hot = GenerationSettings(temperature=3.0, top_p=0.95, max_new_tokens=24)
    torch.manual_seed(3)
    reply, _ = chat(model, tok, "random words", settings=hot, fast=True, max_context=512)
    torch.manual_seed(3)
    streamed = "".join(stream_chat(model, tok, "random words", settings=hot, fast=True, max_context=512))
    torch.manual_seed(4)
    other, _ = chat(model, tok, "random words", settings=hot, fast=True, max_context=512)
    assert streamed == reply != other and len(reply) > 10
