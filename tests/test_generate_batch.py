"""generate_batch fits every conversation to the context as chat does, and says how many it shortened."""

from __future__ import annotations

import pytest

from glmlora.generate import GenerationSettings, chat, fit_history, generate_batch

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=48)


def long_conversation(question: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "你是心理咨询助手。"}]
    for i in range(12):
        msgs += [{"role": "user", "content": f"以前的问题 {i}，说来话长。" * 3},
                 {"role": "assistant", "content": f"以前的回答 {i}。" * 3}]
    return msgs + [{"role": "user", "content": question}]


@pytest.mark.parametrize("fast", [False, True])
def test_long_conversations_are_fitted_like_chat_and_counted(memorised, capsys, fast):
    model, tok, records, _, convs = memorised
    long, short = long_conversation(records[0]["input"]), convs[1][:-1]
    context = 320
    assert len(tok.build_conversation(long, add_generation_prompt=True)) > context  # would not fit as it is
    fitted = fit_history(tok, long, context - GREEDY.max_new_tokens)
    assert fitted[0] == long[0] and len(fitted) < len(long)

    replies = generate_batch(model, tok, [long, short], GREEDY, batch_size=2, progress=False, fast=fast,
                             max_context=context)
    assert "generate_batch: 1 of 2 conversation(s) shortened to fit the context" in capsys.readouterr().out
    assert replies[0] == chat(model, tok, long[-1]["content"], history=long[:-1], settings=GREEDY,
                              max_context=context, fast=fast)[0]
    assert replies[1] == records[1]["output"].strip()


def test_nothing_is_said_when_everything_fits_and_an_impossible_one_is_named(memorised, capsys):
    model, tok, records, _, convs = memorised
    generate_batch(model, tok, [c[:-1] for c in convs[:2]], GREEDY, progress=False, fast=False)
    assert "shortened" not in capsys.readouterr().out
    huge = [{"role": "system", "content": "规则。" * 400}, {"role": "user", "content": "你好"}]
    with pytest.raises(ValueError, match="conversation 1: the system message and the new message alone take"):
        generate_batch(model, tok, [convs[0][:-1], huge], GREEDY, progress=False, fast=False, max_context=256)
