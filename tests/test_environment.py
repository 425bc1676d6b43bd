"""Lesson 01's environment check: versions compared like pip does, every problem named with its fix."""

from __future__ import annotations

import importlib.metadata

import pytest

from glmlora import environment
from glmlora.environment import (EnvironmentProblem, Requirement, check_environment, environment_report,
                                 package_status, suggest_training_config)

REAL_VERSION = importlib.metadata.version


def fake_versions(monkeypatch, **versions: str | None) -> None:
    """Pretend the given packages have these versions (None: not installed); the rest are real."""
    def version(name: str) -> str:
        key = name.replace("-", "_")
        if key in versions:
            if versions[key] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[key]
        return REAL_VERSION(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.fixture
def all_ok(monkeypatch):
    """Every course package at a good version, so a test changes exactly one thing."""
    fake_versions(monkeypatch, **{r.name: r.minimum for r in environment.REQUIREMENTS})


def test_the_real_environment_passes_for_tiny():
    report = check_environment("tiny")
    assert report.ok and report.profile == "tiny"
    assert {p.name for p in report.packages} >= {"torch", "transformers", "peft", "modelscope", "jieba"}


def test_local_build_suffix_counts_as_new_enough():
    req = Requirement("torch", "2.4")
    status = package_status(req)
    assert status.installed is not None
    assert status.status == "ok"


def test_missing_package_is_named_with_its_fix(monkeypatch, all_ok):
    fake_versions(monkeypatch, peft=None)
    with pytest.raises(EnvironmentProblem) as err:
        check_environment("tiny")
    msg = str(err.value)
    assert "1 package(s)" in msg
    assert "peft: missing (not installed; need peft>=0.18)" in msg
    assert 'pip install -U "peft>=0.18"' in msg
    assert "restart the Jupyter kernel" in msg


def test_too_old_package_is_named_with_installed_version(monkeypatch, all_ok):
    fake_versions(monkeypatch, transformers="4.46.3")
    with pytest.raises(EnvironmentProblem) as err:
        check_environment("tiny")
    msg = str(err.value)
    assert "transformers: too old (4.46.3 is installed; need transformers>=5.17,<6)" in msg
    assert 'pip install -U "transformers>=5.17,<6"' in msg


def test_every_problem_is_listed_at_once(monkeypatch, all_ok):
    fake_versions(monkeypatch, torch="2.1.0", datasets=None, sentencepiece="0.1.99")
    with pytest.raises(EnvironmentProblem) as err:
        check_environment("tiny")
    msg = str(err.value)
    assert msg.startswith("3 package(s)")
    for name in ("torch: too old", "datasets: missing", "sentencepiece: too old"):
        assert name in msg
    assert 'pip install -U "torch>=2.4" "datasets>=4" "sentencepiece>=0.2"' in msg
    assert "pytorch.org" in msg  # torch needs the CUDA build on a GPU machine, not the default wheel


def test_major_version_above_the_tested_range_is_refused(monkeypatch, all_ok):
    fake_versions(monkeypatch, transformers="6.0.0")
    with pytest.raises(EnvironmentProblem, match=r"transformers: too new"):
        check_environment("tiny")


def test_modelscope_is_optional_for_tiny_but_required_for_full(monkeypatch, all_ok):
    fake_versions(monkeypatch, modelscope=None)
    report = check_environment("tiny")
    status = {p.name: p for p in report.packages}["modelscope"]
    assert status.status == "optional" and not status.blocking
    assert check_environment("full-random").ok
    with pytest.raises(EnvironmentProblem, match=r'modelscope: missing .*pip install -U "modelscope>=1.20"'):
        check_environment("full")


def test_old_modelscope_does_not_block_tiny(monkeypatch, all_ok):
    fake_versions(monkeypatch, modelscope="1.9.0")
    report = check_environment("tiny")
    assert report.ok
    assert "| modelscope | 1.9.0 | >=1.20 | ⚠️ too old (optional here) |" in report.to_markdown()
    with pytest.raises(EnvironmentProblem, match="modelscope: too old"):
        check_environment("full")


def test_unreadable_version_does_not_block(monkeypatch, all_ok):
    fake_versions(monkeypatch, jieba="custom-build")
    assert {p.name: p.status for p in check_environment("tiny").packages}["jieba"] == "unknown"


def test_profile_comes_from_the_environment_variable(monkeypatch):
    monkeypatch.setenv("GLMLORA_PROFILE", "full-random")
    assert environment_report().profile == "full-random"
    with pytest.raises(ValueError, match="GLMLORA_PROFILE"):
        environment_report("huge")


def test_report_renders_tables(monkeypatch, all_ok):
    fake_versions(monkeypatch, peft="0.10.0")
    report = environment_report("tiny")
    md, page = report.to_markdown(), report._repr_html_()
    assert "| peft | 0.10.0 | >=0.18 | ❌ too old |" in md
    assert "| Python |" in md and "| CPU cores |" in md
    assert "<table>" in page and "peft" in page and "too old" in page


def test_machine_info_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = environment.machine_info()
    assert info.gpu_name is None and info.gpu_memory_gib == 0.0 and not info.bf16
    assert info.cpu_count >= 1 and info.python.count(".") == 2


@pytest.mark.parametrize("gib, profile, pack, ga, every, length, four_bit", [
    (80, "full", 4096, 1, 2, 1024, False),
    (24, "full", 4096, 1, 2, 1024, False),
    (23.7, "full", 4096, 1, 2, 1024, False),   # an RTX 3090 / 4090 "24 GB"
    (22, "full", 4096, 1, 2, 1024, False),
    (20, "full", 2048, 2, 2, 1024, False),
    (19.5, "full", 2048, 2, 2, 1024, False),   # a quarter A100 "20 GB"
    (18, "full", 2048, 2, 2, 1024, False),
    (17, "full", 2048, 2, 1, 1024, False),
    (15.6, "full", 2048, 2, 1, 1024, False),   # an RTX 4060 Ti "16 GB"
    (14.6, "full", 2048, 2, 1, 1024, False),   # a T4 "16 GB"
    (11.7, "full", 2048, 2, 1, 1024, True),    # an RTX 3060 "12 GB": QLoRA
    (10.7, "full", 2048, 2, 1, 1024, True),    # an RTX 2080 Ti "11 GB"
    (9.8, "full", 2048, 2, 1, 1024, True),     # an RTX 3080 "10 GB"
    (7.8, "tiny", 1024, 1, 1, 512, False),     # an 8 GB card
    (0, "tiny", 1024, 1, 1, 512, False),
])
def test_suggestion_per_card(gib, profile, pack, ga, every, length, four_bit):
    s = suggest_training_config(gib, bf16=True)
    assert (s.profile, s.pack_tokens, s.gradient_accumulation_steps, s.max_length) == (profile, pack, ga, length)
    assert s.load_in_4bit is four_bit and s.gradient_checkpointing and s.checkpoint_every == every
    assert s.per_device_train_batch_size == 1  # always one packed row per step
    assert s.overrides() == {"gradient_accumulation_steps": ga,
                             "gradient_checkpointing_kwargs": {"use_reentrant": False, "every_n_layers": every}}
    if profile == "full":  # every suggestion leaves a gigabyte below what torch may use on the card
        assert s.estimated_peak_gib <= gib - environment.CONTEXT_GIB - environment.HEADROOM_GIB


@pytest.mark.parametrize("gib, measured", [(23.7, 19.29), (19.5, 15.56), (15.6, 12.62), (14.6, 12.66), (9.8, 4.89)])
def test_estimates_agree_with_the_capped_runs(gib, measured):
    """The per-card peaks measured under each card's memory (BENCHMARKS.md, "Settings per card") within 0.2 GiB."""
    assert suggest_training_config(gib, bf16=gib != 14.6).estimated_peak_gib == pytest.approx(measured, abs=0.2)


def test_every_second_layer_only_where_its_activations_fit(monkeypatch):
    """Keeping every 2nd layer's activations is chosen by the estimate at the row length actually used: a 20 GB card
    keeps them on 2,048-token rows but not on 4,096 (measured: out of memory), a 16 GB card never."""
    from glmlora.environment import checkpoint_every_for

    for gib, pack, every in ((23.7, 4096, 2), (19.5, 4096, 1), (19.5, 2048, 2), (15.6, 2048, 1), (79.1, 4096, 2)):
        monkeypatch.setattr(environment, "machine_info", lambda gib=gib: environment.MachineInfo(
            "GPU", gib, "8.6", True, 4, "3.12.0"))
        assert checkpoint_every_for("full", None, pack) == every, (gib, pack)
        assert checkpoint_every_for("full", 3, pack) == 3  # the learner's choice wins
        assert checkpoint_every_for("tiny", None, pack) == 1
        assert checkpoint_every_for("full", None, pack, load_in_4bit=True) == 1  # not measured with QLoRA


def test_qlora_fits_the_smallest_supported_card_with_a_gigabyte_to_spare():
    s = suggest_training_config(environment.QLORA_MIN_GIB, bf16=True)
    assert s.load_in_4bit and s.estimated_peak_gib < environment.QLORA_MIN_GIB - 1
    assert s.estimated_peak_gib < suggest_training_config(15.6, bf16=True).estimated_peak_gib - 6  # 4-bit weights
    assert "QLoRA" in s.reason and s.precision.startswith("4-bit NF4 base, bf16 compute")
    assert suggest_training_config(10.7, bf16=False).precision.endswith("(fp16 AMP)")


def test_suggestion_matches_the_profiles():
    from glmlora.profiles import select_profile

    for name, gib in (("full", 24), ("tiny", 0)):
        p, s = select_profile(name), suggest_training_config(gib, bf16=bool(gib))
        assert (s.pack_tokens, s.max_length) == (p.pack_tokens, p.max_length)


def test_shorter_rows_keep_the_tokens_per_step():
    big, mid = suggest_training_config(24, bf16=True), suggest_training_config(17, bf16=True)
    assert big.tokens_per_step == mid.tokens_per_step == 4096
    assert mid.estimated_peak_gib < big.estimated_peak_gib
    every_layer = environment.TrainingSuggestion("full", 4096, 1, 1024, "")
    assert every_layer.estimated_peak_gib == environment.MEASURED_PEAK_GIB
    assert suggest_training_config(8, bf16=True).estimated_peak_gib is None


def test_big_card_reason_cites_the_measurement():
    reason = suggest_training_config(23.7, bf16=True).reason
    assert "19.3 GiB" in reason and "23.2 GiB cap" in reason and "BENCHMARKS.md" in reason and "emulated" in reason
    assert "23.7 GiB" in reason and "every 2nd layer" in reason


def test_reasons_cite_the_run_of_that_path():
    """A card without bf16 is told the fp16 path's own measurement, and what was not measured for it."""
    assert "14.1 GiB cap on the fp16 path" in suggest_training_config(14.6, bf16=False).reason
    assert "15.1 GiB cap" in suggest_training_config(15.6, bf16=True).reason
    assert "fp16 compute not measured" in suggest_training_config(10.7, bf16=False).reason
    assert "not measured" not in suggest_training_config(11.7, bf16=True).reason


def test_suggestion_for_small_cards_is_the_tiny_profile():
    assert suggest_training_config(7.8, bf16=True).reason.startswith("7.8 GiB is too little for the 6B model")
    no_gpu = suggest_training_config(0.0, bf16=False)
    assert "no CUDA GPU" in no_gpu.reason and no_gpu.precision == "fp32 (CPU)"


def test_suggestion_precision():
    assert suggest_training_config(24, bf16=True).precision == "bf16"
    assert suggest_training_config(24, bf16=False).precision.startswith("fp16 weights + fp32 LoRA")
    assert suggest_training_config(16, bf16=False).precision.startswith("fp16 weights + fp32 LoRA")


def test_suggestion_reads_this_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = suggest_training_config()
    assert (s.profile, s.pack_tokens, s.precision) == ("tiny", 1024, "fp32 (CPU)")


# ---------------------------------------------------------------------------------------------- fp16-only cards
@pytest.fixture
def bf16_gpu(monkeypatch):
    """A CUDA GPU with bf16, as far as these functions can tell."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv(environment.NO_BF16_ENV, raising=False)


def test_precision_follows_bf16_support(bf16_gpu, monkeypatch):
    import torch

    from glmlora.training import precision_flags, training_dtype

    assert environment.bf16_supported() and precision_flags() == {"bf16": True, "fp16": False}
    assert training_dtype() == torch.bfloat16
    monkeypatch.setenv(environment.NO_BF16_ENV, "1")  # how the fp16 path is forced on a bf16 GPU
    assert not environment.bf16_supported()
    assert precision_flags() == {"bf16": False, "fp16": True} and training_dtype() == torch.float16
    monkeypatch.setenv(environment.NO_BF16_ENV, "0")
    assert environment.bf16_supported()


def test_forced_fp16_changes_the_suggestion_precision(bf16_gpu, monkeypatch):
    from types import SimpleNamespace

    import torch

    card = SimpleNamespace(name="NVIDIA GeForce RTX 3090", total_memory=int(23.7 * 1024 ** 3), major=8, minor=6)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)
    assert suggest_training_config().precision == "bf16"
    monkeypatch.setenv(environment.NO_BF16_ENV, "1")
    assert environment.machine_info().bf16 is False
    assert suggest_training_config().precision == "fp16 weights + fp32 LoRA (fp16 AMP)"
