"""The two editions of the course: built from one source, identical code, committed clean (tools/build_notebooks.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks as bn  # noqa: E402

LESSONS = [p.stem for p in bn.sources()]


def committed(lang: str, lesson: str) -> nbformat.NotebookNode:
    text = bn.committed_text(ROOT / "notebooks" / lang / f"{lesson}.ipynb")
    assert text is not None, f"notebooks/{lang}/{lesson}.ipynb is not committed"
    return nbformat.reads(text, as_version=4)


def test_every_lesson_exists_in_both_languages():
    assert LESSONS, "no lesson sources in notebooks/src"
    for lang in bn.LANGS:
        on_disk = sorted(p.stem for p in (ROOT / "notebooks" / lang).glob("*.ipynb"))
        assert on_disk == LESSONS, f"notebooks/{lang} holds {on_disk}, the sources are {LESSONS}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_code_cells_are_identical_across_languages(lesson):
    zh, en = committed("zh", lesson), committed("en", lesson)
    assert [c.cell_type for c in zh.cells] == [c.cell_type for c in en.cells], "cells do not pair 1:1"
    for i, (a, b) in enumerate(zip(zh.cells, en.cells)):
        if a.cell_type == "code":
            assert a.source == b.source, f"{lesson} cell {i}: the zh and en code differ"
            assert a.metadata.get("tags") == b.metadata.get("tags"), f"{lesson} cell {i}: tags differ"


@pytest.mark.parametrize("lesson", LESSONS)
def test_committed_notebooks_are_built_from_the_source(lesson):
    for lang in bn.LANGS:
        built = bn.render(bn.build(bn.SRC / f"{lesson}.cells", lang))
        assert bn.committed_text(ROOT / "notebooks" / lang / f"{lesson}.ipynb") == built, \
            f"notebooks/{lang}/{lesson}.ipynb differs from notebooks/src/{lesson}.cells: run `make notebooks`"


@pytest.mark.parametrize("lesson", LESSONS)
def test_structure_kernel_and_parameters(lesson):
    nb = committed("en", lesson)
    assert nb.metadata["kernelspec"]["name"] == "glmlora"  # the kernel the README registers
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and code[0].metadata.get("tags") == ["parameters"], "the first code cell must be the parameters cell"
    assert not any(c.outputs or c.execution_count for c in code), "committed with outputs"


def test_source_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "99_bad.cells"
    bad.write_text("<!-- markdown -->\n<!-- zh -->\n中文\n<!-- code -->\nx = 1\n", encoding="utf-8")
    with pytest.raises(bn.SourceError, match=r"99_bad.cells:1: markdown cell without 'en' text"):
        bn.parse(bad)
    bad.write_text("stray text\n<!-- code -->\nx = 1\n", encoding="utf-8")
    with pytest.raises(bn.SourceError, match=r"99_bad.cells:1: text outside a cell"):
        bn.parse(bad)


def test_build_pairs_markdown_and_shares_code(tmp_path):
    src = tmp_path / "98_ok.cells"
    src.write_text("<!-- markdown -->\n<!-- zh -->\n# 标题\n<!-- en -->\n# Title\n\n<!-- code tags=parameters -->\n"
                   "X = 1  # a knob\n\n<!-- code -->\nprint(X)\n", encoding="utf-8")
    zh, en = bn.build(src, "zh"), bn.build(src, "en")
    assert [c.source for c in zh.cells] == ["# 标题", "X = 1  # a knob", "print(X)"]
    assert [c.source for c in en.cells] == ["# Title", "X = 1  # a knob", "print(X)"]
    assert zh.cells[1].metadata["tags"] == ["parameters"] and [c.id for c in zh.cells] == [c.id for c in en.cells]


#: Lessons 03-07 end with a recap for a person, exercises and troubleshooting (issue 12, COURSE_STYLE.md §5).
ENDINGS = {"zh": ("## 小结", "## 练习", "## 常见问题", "## 下一步"),
           "en": ("## Recap", "## Exercises", "## Troubleshooting", "## Next")}
EXERCISE = {"zh": re.compile(r"\*\*练习 \d"), "en": re.compile(r"\*\*Exercise \d")}
#: The calls each lesson must show as code (the learner sees and runs them), not behind a helper.
SHOWN = {"02_download": ("snapshot_download(",),
         "04_formatting": ("def process_func(",),
         "05_lora_training": ("LoraConfig(", "get_peft_model(", "TrainingArguments(", "Trainer(", ".train(",
                              "enable_input_require_grads()"),
         "06_reload_and_chat": ("PeftModel.from_pretrained(", "merge_and_unload()", ".generate(")}


@pytest.mark.parametrize("lesson", [x for x in LESSONS if "03" <= x[:2] <= "07"])
@pytest.mark.parametrize("lang", bn.LANGS)
def test_lessons_end_with_recap_exercises_and_troubleshooting(lesson, lang):
    markdown = [c.source for c in committed(lang, lesson).cells if c.cell_type == "markdown"]
    text = "\n".join(markdown)
    positions = [text.find(h) for h in ENDINGS[lang]]
    assert all(p >= 0 for p in positions), f"{lang}/{lesson} lacks {[h for h, p in zip(ENDINGS[lang], positions) if p < 0]}"
    assert positions == sorted(positions), f"{lang}/{lesson}: the closing sections are out of order"
    assert 2 <= len(EXERCISE[lang].findall(text)) <= 4, f"{lang}/{lesson} should have 2-4 exercises"


@pytest.mark.parametrize("lesson", sorted(SHOWN))
def test_lessons_show_the_calls_they_teach(lesson):
    code = "\n".join(c.source for c in committed("en", lesson).cells if c.cell_type == "code")
    missing = [call for call in SHOWN[lesson] if call not in code]
    assert not missing, f"{lesson} must show {missing} in a code cell"


def test_zh_markdown_is_mostly_chinese():
    for lesson in LESSONS:
        text = "\n".join(c.source for c in committed("zh", lesson).cells if c.cell_type == "markdown")
        text = re.sub(r"```.*?```|`[^`]*`|\(\S*\)|<[^>]+>", "", text, flags=re.S)  # code, links, html
        cjk, latin = len(re.findall(r"[\u4e00-\u9fff]", text)), len(re.findall(r"[A-Za-z]", text))
        assert cjk / max(cjk + latin, 1) >= 0.5, f"zh/{lesson}: only {cjk / max(cjk + latin, 1):.0%} Chinese"
