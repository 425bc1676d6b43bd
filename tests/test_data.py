"""Records: the bundled sample set, validation messages with file/line/field, the split."""

from __future__ import annotations

import json

import pytest

from glmlora.data import (DataError, is_crisis_reply, is_referral, language, load_records, read_jsonl, sample_data_path,
                          split_records, summary, to_messages)


@pytest.fixture(scope="module")
def sample():
    return load_records(sample_data_path())


def test_bundled_sample_is_valid_and_varied(sample):
    s = summary(sample)
    assert s["records"] >= 200
    assert s["by_kind"]["single"] > 0 and s["by_kind"]["multi"] > 0
    assert s["by_language"]["zh"] > 0 and s["by_language"]["en"] > 0
    assert s["crisis_replies"] >= 20


def test_crisis_records_refer_to_professional_help(sample):
    crisis = [r for r in sample if is_crisis_reply(to_messages(r)[-1]["content"])]
    assert len(crisis) >= 20
    for r in crisis:
        reply = to_messages(r)[-1]["content"]
        assert ("专业" in reply) if language(r) == "zh" else ("professional" in reply.lower())


def test_problems_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"system": "s", "input": "hi", "output": "hello"}),
        "{not json",
        json.dumps({"input": "hi"}),
        json.dumps({"input": "hi", "ouput": "typo"}),
        "",
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        json.dumps(["a list"]),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, problems, blank = read_jsonl(path)
    assert len(records) == 1 and blank == 1
    found = {(p.line, p.field) for p in problems}
    assert {(2, "<json>"), (3, "output"), (4, "ouput"), (4, "output"), (6, "messages[0].role"),
            (7, "messages[1].content"), (8, "messages"), (9, "<record>")} <= found
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:4: field 'ouput': unknown field" in str(err.value)


def test_split_is_reproducible_disjoint_and_stratified(sample):
    train, val = split_records(sample, 0.1, seed=7)
    again, val2 = split_records(sample, 0.1, seed=7)
    assert val == val2 and len(train) + len(val) == len(sample)
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert {language(r) for r in val} == {"zh", "en"}
    assert any(is_crisis_reply(to_messages(r)[-1]["content"]) for r in val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(sample, 1.5)


def test_to_messages_for_both_shapes():
    assert to_messages({"system": " ", "input": "a", "output": "b"}) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert to_messages(multi) == multi["messages"] and to_messages(multi) is not multi["messages"]


@pytest.mark.parametrize("text,expected", [("请拨打心理援助热线 12356", True), ("Please call 988 now", True),
                                           ("建议找专业的心理咨询师聊聊", True), ("Try a short walk.", False),
                                           ("早点休息，120 分钟后再看", False)])
def test_referral_keyword_rule(text, expected):
    assert is_referral(text) is expected


def test_split_on_disk_is_remade_when_its_settings_change(tmp_path, monkeypatch):
    from glmlora.pipeline import ensure_splits
    from glmlora.profiles import select_profile

    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path))
    profile = select_profile("tiny")
    train, val = ensure_splits(profile, val_fraction=0.1)
    n_val = len(load_records(val))
    assert ensure_splits(profile, val_fraction=0.1) == (train, val) and len(load_records(val)) == n_val
    ensure_splits(profile, val_fraction=0.2)
    assert len(load_records(val)) > n_val


def test_a_byte_order_mark_tabs_and_windows_line_ends_are_read(tmp_path):
    """What Notepad and spreadsheets save: a UTF-8 BOM, CRLF line ends, raw tabs inside strings."""
    path = tmp_path / "notepad.jsonl"
    lines = ['{"input": "第一行\tTab", "output": "好的"}', '{"input": "b", "output": "c"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    records = load_records(path)
    assert records == [{"input": "第一行\tTab", "output": "好的"}, {"input": "b", "output": "c"}]
    assert type(records[0]) is dict  # plain dicts, whatever the duplicate-key check used while parsing


def test_the_split_follows_the_data_file_and_says_when_it_changed(tmp_path, monkeypatch, capsys):
    from glmlora.pipeline import ensure_splits
    from glmlora.profiles import select_profile

    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path / "work"))
    profile = select_profile("tiny")
    source = tmp_path / "mine.jsonl"
    rows = [{"input": f"问题 {i}", "output": f"回答 {i}"} for i in range(20)]
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    train, val = ensure_splits(profile, source)
    assert len(load_records(train)) + len(load_records(val)) == 20
    stamp = json.loads((profile.data_dir / "split.json").read_text())
    capsys.readouterr()

    # the same path, other contents (same size and one invalid record): validated again, not reused
    rows[3] = {"input": f"问题 {3}", "ouput": f"回答 {3}"}
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{source}:4: field 'ouput'"):
        ensure_splits(profile, source)
    assert "has changed since the split" in capsys.readouterr().out
    assert json.loads((profile.data_dir / "split.json").read_text()) == stamp  # the old split is left as it was

    rows = rows[:3] + rows[4:]
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    train, val = ensure_splits(profile, source)
    assert len(load_records(train)) + len(load_records(val)) == 19
    capsys.readouterr()
    assert ensure_splits(profile, source) == (train, val) and capsys.readouterr().out == ""  # reused, silently


def test_too_few_records_for_a_validation_split_is_said_not_hidden(tmp_path, monkeypatch, capsys):
    from glmlora.pipeline import ensure_splits
    from glmlora.profiles import select_profile

    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path / "work"))
    source = tmp_path / "five.jsonl"
    source.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    train, val = ensure_splits(select_profile("tiny"), source)
    assert len(load_records(train)) == 5 and val.read_text() == ""
    assert "validation set empty: 5 record(s) are too few for a 10% validation split; evaluation is skipped" in \
        capsys.readouterr().out
