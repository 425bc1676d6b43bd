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


# ----------------------------------------------------------------------------------------- what the lessons say
# These read the notebooks as built from notebooks/src (what a lesson says now); the tests above make sure the
# committed notebooks are exactly that build. Each check returns the problems it found, worded as what to fix,
# so that the tests at the end can feed it a broken lesson and see it complain.

#: The closing sections of a lesson, in this order (COURSE_STYLE.md §2, §5).
CLOSING = {"zh": {"recap": "## 小结", "exercises": "## 练习", "troubleshooting": "## 常见问题", "next": "## 下一步"},
           "en": {"recap": "## Recap", "exercises": "## Exercises", "troubleshooting": "## Troubleshooting",
                  "next": "## Next"}}
ORDER = ("recap", "exercises", "troubleshooting", "next")
EXERCISE = {"zh": re.compile(r"\*\*练习 \d"), "en": re.compile(r"\*\*Exercise \d")}
EXERCISE_FORM = {"zh": "**练习 1（2 分钟）**", "en": "**Exercise 1 (2 min)**"}
#: Lessons with the full ending: recap, 2-4 exercises, troubleshooting, next (issue 12; 08 and 09 follow it too).
FULL_ENDING = [x for x in LESSONS if "03" <= x[:2] <= "09"]
LEARNER_LESSONS = [x for x in LESSONS if x[:2] <= "07"]
APPENDIX = "09_performance"
#: The calls each lesson must show as code (the learner sees and runs them), not behind a helper.
SHOWN = {"02_download": ("snapshot_download(",),
         "04_formatting": ("def process_func(",),
         "05_lora_training": ("LoraConfig(", "get_peft_model(", "TrainingArguments(", "Trainer(", ".train(",
                              "enable_input_require_grads()"),
         "06_reload_and_chat": ("PeftModel.from_pretrained(", "merge_and_unload()", ".generate(")}
#: Performance engineering lives in the appendix 09, not on the learner's path (issue 12, item 4).
PERFORMANCE_TERMS = ("CUDA graph", "CUDA 图", "cudagraph", "MFU", "memory-bandwidth", "memory bandwidth", "显存带宽")


def edition(lang: str, lesson: str, src: Path | None = None) -> nbformat.NotebookNode:
    """The ``lang`` notebook of ``lesson`` as its source builds it (``src`` overrides the source file)."""
    return bn.build(src or bn.SRC / f"{lesson}.cells", lang)


def markdown(nb: nbformat.NotebookNode) -> str:
    """All markdown of a notebook, fenced code blocks left out (a '## ' there is no heading)."""
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return re.sub(r"```.*?```", "", text, flags=re.S)


def sections(text: str, lang: str) -> list[tuple[str, str | None, str]]:
    """``(heading, closing kind or None, body)`` for every '## ' heading, in order."""
    found: list[tuple[str, str | None, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            kind = next((k for k, h in CLOSING[lang].items() if line.strip().startswith(h)), None)
            found.append((line.strip(), kind, []))
        elif found:
            found[-1][2].append(line)
    return [(h, k, "\n".join(body)) for h, k, body in found]


def count_entries(body: str) -> int:
    """Table body rows plus list items: the entries of a recap or a troubleshooting section."""
    rows = [ln for ln in body.splitlines() if ln.lstrip().startswith("|")]
    separators = [ln for ln in rows if set(ln.strip()) <= set("|-: ")]
    items = [ln for ln in body.splitlines() if re.match(r"\s*([*-]|\d+\.) ", ln)]
    return len(rows) - 2 * len(separators) + len(items)


def ending_problems(nb: nbformat.NotebookNode, lang: str, full: bool) -> list[str]:
    """What is wrong with how a notebook ends: recap (2-6 points), then exercises and troubleshooting when
    ``full``, then next as the last section and the last cell."""
    heads = CLOSING[lang]
    found = sections(markdown(nb), lang)
    kinds = [k for _, k, _ in found]
    wanted = ORDER if full else ("recap", "next")
    problems = [f"add a '{heads[k]}' section" for k in wanted if k not in kinds]
    if "recap" in kinds:
        after = found[kinds.index("recap") + 1:]
        problems += [f"'{h}' comes after '{heads['recap']}': put every step before the recap, which opens the "
                     f"lesson's closing sections" for h, k, _ in after if k is None]
        points = count_entries(found[kinds.index("recap")][2])
        if not 2 <= points <= 6:
            problems.append(f"'{heads['recap']}' has {points} points: write 2-6 bullets of what the learner can do now")
    present = [k for k in ORDER if k in kinds]
    if [k for k in dict.fromkeys(kinds) if k] != present:
        problems.append("the closing sections are out of order: write them as "
                        + " -> ".join(heads[k] for k in present))
    if kinds and kinds[-1] != "next" and "next" in kinds:
        problems.append(f"'{heads['next']}' must be the last section")
    last = nb.cells[-1] if nb.cells else None
    if "next" in kinds and (last is None or last.cell_type != "markdown" or heads["next"] not in last.source):
        problems.append(f"the notebook must end with its '{heads['next']}' cell: move the cells after it above "
                        f"'{heads['recap']}' (a SUMMARY line for CI stays above the recap)")
    if full and "exercises" in kinds:
        body = found[kinds.index("exercises")][2]
        n, details = len(EXERCISE[lang].findall(body)), body.count("<details>")
        if not 2 <= n <= 4:
            problems.append(f"'{heads['exercises']}' has {n} exercise(s): write 2-4, each starting like "
                            f"{EXERCISE_FORM[lang]}")
        if details < n:
            problems.append(f"{n - details} exercise(s) lack the expected observation: add <details><summary>"
                            f"{'你应该看到' if lang == 'zh' else 'You should see'}</summary>...</details>")
    if full and "troubleshooting" in kinds:
        entries = count_entries(found[kinds.index("troubleshooting")][2])
        if entries < 3:
            problems.append(f"'{heads['troubleshooting']}' has {entries} entries: write 3-6 rows of symptom (the "
                            f"exact message) | cause | fix")
    return problems


def missing_calls(nb: nbformat.NotebookNode, calls: tuple[str, ...]) -> list[str]:
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return [call for call in calls if call not in code]


def mentions(nb: nbformat.NotebookNode, terms: tuple[str, ...]) -> list[str]:
    """'cell N: term' for every cell (markdown or code) that mentions one of ``terms`` (case-insensitive)."""
    return [f"cell {i}: {term!r}" for i, c in enumerate(nb.cells) for term in terms if term.lower() in c.source.lower()]


def chinese_share(nb: nbformat.NotebookNode) -> float:
    """Chinese characters / (Chinese + Latin letters) in the markdown, code, links and HTML tags left out."""
    text = re.sub(r"`[^`]*`|\(\S*\)|<[^>]+>", "", markdown(nb))
    cjk, latin = len(re.findall(r"[\u4e00-\u9fff]", text)), len(re.findall(r"[A-Za-z]", text))
    return cjk / max(cjk + latin, 1)


def broken_links(nb: nbformat.NotebookNode, folder: Path) -> list[str]:
    """Relative link targets in the markdown that do not exist next to the notebook."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown(nb))
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    return [t for t in local if t and not (folder / t).exists()]


@pytest.mark.parametrize("lesson", LESSONS)
@pytest.mark.parametrize("lang", bn.LANGS)
def test_every_notebook_ends_with_recap_and_next(lesson, lang):
    problems = ending_problems(edition(lang, lesson), lang, full=False)
    assert not problems, f"notebooks/src/{lesson}.cells ({lang}): " + "; ".join(problems)


@pytest.mark.parametrize("lesson", FULL_ENDING)
@pytest.mark.parametrize("lang", bn.LANGS)
def test_lessons_end_with_recap_exercises_and_troubleshooting(lesson, lang):
    problems = ending_problems(edition(lang, lesson), lang, full=True)
    assert not problems, f"notebooks/src/{lesson}.cells ({lang}): " + "; ".join(problems)


@pytest.mark.parametrize("lesson", sorted(SHOWN))
def test_lessons_show_the_calls_they_teach(lesson):
    missing = missing_calls(edition("en", lesson), SHOWN[lesson])
    assert not missing, f"notebooks/src/{lesson}.cells must show {missing} in a code cell (the call, not a helper)"


@pytest.mark.parametrize("lesson", LESSONS)
def test_zh_markdown_is_mostly_chinese(lesson):
    share = chinese_share(edition("zh", lesson))
    assert share >= 0.5, (f"notebooks/src/{lesson}.cells: the <!-- zh --> markdown is only {share:.0%} Chinese; write "
                          f"the zh parts in Chinese (English terms once, in parentheses)")


def test_performance_appendix_exists_in_both_languages():
    assert APPENDIX in LESSONS, f"notebooks/src/{APPENDIX}.cells is missing: the performance appendix (issue 12)"
    zh, en = edition("zh", APPENDIX), edition("en", APPENDIX)
    assert len(zh.cells) == len(en.cells) > 0
    assert [c.source for c in zh.cells if c.cell_type == "markdown"] != \
           [c.source for c in en.cells if c.cell_type == "markdown"], f"{APPENDIX}: the zh and en markdown are the same"
    for lang in bn.LANGS:
        assert bn.target(bn.SRC / f"{APPENDIX}.cells", lang).is_file(), \
            f"notebooks/{lang}/{APPENDIX}.ipynb is missing: run `make notebooks`"


@pytest.mark.parametrize("lesson", LESSONS)
def test_no_notebook_cites_design_md(lesson):
    for lang in bn.LANGS:
        found = mentions(edition(lang, lesson), ("DESIGN.md",))
        assert not found, (f"notebooks/src/{lesson}.cells ({lang}) cites DESIGN.md, which is not in the repository "
                           f"({', '.join(found)}): cite docs/design.md instead")


@pytest.mark.parametrize("lesson", LEARNER_LESSONS)
def test_learner_notebooks_leave_performance_internals_to_the_appendix(lesson):
    for lang in bn.LANGS:
        found = mentions(edition(lang, lesson), PERFORMANCE_TERMS)
        assert not found, (f"notebooks/src/{lesson}.cells ({lang}) explains performance internals "
                           f"({', '.join(found)}): move them to notebooks/src/{APPENDIX}.cells and link to it")


@pytest.mark.parametrize("lesson", LESSONS)
def test_markdown_links_point_to_files_that_exist(lesson):
    for lang in bn.LANGS:
        broken = broken_links(edition(lang, lesson), ROOT / "notebooks" / lang)
        assert not broken, f"notebooks/src/{lesson}.cells ({lang}) links to missing files: {broken}"


# ------------------------------------------------------------------------------- the checks can fail
GOOD = """<!-- markdown -->
<!-- zh -->
# 99 · 示例
**本节目标**　看看检查是否有效。
<!-- en -->
# 99 · Example
**Purpose.** See whether the checks work.
<!-- code tags=parameters -->
X = 1  # a knob
<!-- markdown -->
<!-- zh -->
## 1. 第一步
这里讲解第一步，并且说明为什么。
<!-- en -->
## 1. Step one
Here is step one, and why.
<!-- code -->
print(X)
<!-- markdown -->
<!-- zh -->
## 小结
* 你学会了第一步。
* 你知道了为什么。
## 练习
**练习 1（2 分钟）** 改变参数。
<details><summary>你应该看到</summary>结果变了。</details>

**练习 2（2 分钟）** 再改一次。
<details><summary>你应该看到</summary>又变了。</details>
## 常见问题
| 现象 | 原因 | 解决 |
|---|---|---|
| 报错甲 | 原因甲 | 办法甲 |
| 报错乙 | 原因乙 | 办法乙 |
| 报错丙 | 原因丙 | 办法丙 |
## 下一步
去 [下一课](99_next.ipynb)。
<!-- en -->
## Recap
* You learned step one.
* You know why.
## Exercises
**Exercise 1 (2 min)** Change the knob.
<details><summary>You should see</summary>It changes.</details>

**Exercise 2 (2 min)** Change it again.
<details><summary>You should see</summary>It changes again.</details>
## Troubleshooting
| Symptom | Cause | Fix |
|---|---|---|
| error A | cause A | fix A |
| error B | cause B | fix B |
| error C | cause C | fix C |
## Next
Go to [the next lesson](99_next.ipynb).
"""


def test_lesson_checks_pass_a_complete_lesson(tmp_path):
    src = tmp_path / "99_good.cells"
    src.write_text(GOOD, encoding="utf-8")
    (tmp_path / "99_next.ipynb").write_text("{}", encoding="utf-8")
    for lang in bn.LANGS:
        nb = edition(lang, "99_good", src)
        assert ending_problems(nb, lang, full=True) == []
        assert mentions(nb, PERFORMANCE_TERMS + ("DESIGN.md",)) == [] and broken_links(nb, tmp_path) == []
    assert chinese_share(edition("zh", "99_good", src)) >= 0.5 and missing_calls(edition("en", "99_good", src),
                                                                                 ("print(",)) == []


def test_lesson_checks_catch_a_broken_lesson(tmp_path):
    broken = (GOOD.replace("## 1. 第一步", "## 1. Step one (see DESIGN.md, one CUDA graph, MFU)")
              .replace("**练习 2（2 分钟）** 再改一次。\n<details><summary>你应该看到</summary>又变了。</details>", "")
              .replace("| 报错乙 | 原因乙 | 办法乙 |\n| 报错丙 | 原因丙 | 办法丙 |\n", "")
              .replace("## 小结\n", "## 2. 小结之前还有一步\n文字。\n## 小结\n")
              .replace("这里讲解第一步，并且说明为什么。", "Here is step one, and why, in English only. " * 20)
              .replace("print(X)", "print(X)\n<!-- markdown -->\n<!-- zh -->\n## 下一步\n先看这里。\n<!-- en -->\n"
                                   "## Next\nLook here first.")
              .replace("(99_next.ipynb)", "(98_missing.ipynb)"))
    src = tmp_path / "99_bad.cells"
    src.write_text(broken, encoding="utf-8")
    zh = edition("zh", "99_bad", src)
    problems = " | ".join(ending_problems(zh, "zh", full=True))
    assert "'## 练习' has 1 exercise(s): write 2-4" in problems
    assert "'## 常见问题' has 1 entries" in problems
    assert "the closing sections are out of order" in problems  # 下一步 came first
    src.write_text(broken.replace("## 2. 小结之前还有一步\n文字。\n## 小结\n", "## 小结\n## 2. 小结之后还有一步\n"),
                   encoding="utf-8")
    late = " | ".join(ending_problems(edition("zh", "99_bad", src), "zh", full=False))
    assert "'## 2. 小结之后还有一步' comes after '## 小结'" in late
    assert mentions(zh, ("DESIGN.md",)) == ["cell 2: 'DESIGN.md'"]
    assert {m.split(": ")[1] for m in mentions(zh, PERFORMANCE_TERMS)} == {"'CUDA graph'", "'MFU'"}
    assert chinese_share(zh) < 0.5
    assert broken_links(zh, tmp_path) == ["98_missing.ipynb"]
    assert missing_calls(edition("en", "99_bad", src), ("LoraConfig(",)) == ["LoraConfig("]
    src.write_text(GOOD + "<!-- code -->\nprint('SUMMARY')\n", encoding="utf-8")  # a code cell after Next
    tail = ending_problems(edition("en", "99_bad", src), "en", full=False)
    assert tail == ["the notebook must end with its '## Next' cell: move the cells after it above '## Recap' "
                    "(a SUMMARY line for CI stays above the recap)"]
