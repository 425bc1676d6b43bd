"""Training attention per card (issue 13): kernel options that fit, the first-use check and its SDPA fallback,
the compile cache under the work directory, and the QLoRA / fp16 preparation of the model. All on CPU: the GPU
parts are simulated (a fake card, a probe that fails the way Triton does); benchmarks/issue13.py runs them for real.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from glmlora import fast

RTX_3090 = SimpleNamespace(name="NVIDIA GeForce RTX 3090", major=8, minor=6, shared_memory_per_block_optin=101_376)
A100 = SimpleNamespace(name="NVIDIA A100-SXM4-40GB", major=8, minor=0, shared_memory_per_block_optin=166_912)
T4 = SimpleNamespace(name="Tesla T4", major=7, minor=5, shared_memory_per_block_optin=65_536)


@pytest.mark.parametrize("capability, smem, expected", [
    ((7, 0), 98_304, None),                       # V100: SDPA
    ((7, 5), 65_536, None),                       # T4, RTX 2080 Ti
    ((8, 0), 166_912, {}),                        # A100: torch's defaults
    ((9, 0), 232_448, {}),                        # H100 / H200
    ((8, 6), 101_376, fast.SMALL_SMEM_OPTIONS),   # RTX 3090, A10G
    ((8, 9), 101_376, fast.SMALL_SMEM_OPTIONS),   # RTX 4090, L4
    ((12, 0), 101_376, fast.SMALL_SMEM_OPTIONS),  # RTX 5090
])
def test_kernel_options_per_card(capability, smem, expected):
    assert fast.flex_kernel_options(capability, smem) == expected


def test_small_smem_options_are_two_stage_tiles_that_divide_the_mask_blocks():
    opts = fast.SMALL_SMEM_OPTIONS
    assert opts["fwd_num_stages"] == opts["bwd_num_stages"] == 2
    for key in ("fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"):
        assert 128 % opts[key] == 0, key  # flex attention's block mask works in 128-token blocks
    assert opts["bwd_BLOCK_N1"] % opts["bwd_BLOCK_M1"] == 0 and opts["bwd_BLOCK_M2"] % opts["bwd_BLOCK_N2"] == 0


@pytest.fixture
def fake_card(monkeypatch):
    """Pretend this CPU machine has ``card`` as CUDA device 0; returns a setter and the probe's calls."""
    calls: list[dict] = []
    monkeypatch.setattr(fast, "_chosen", {})
    monkeypatch.setattr(fast, "use_compile_cache", lambda directory=None: None)
    monkeypatch.delenv(fast.ATTENTION_ENV, raising=False)

    def use(card: SimpleNamespace, probe=None) -> list[dict]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)

        def record(options, dtype, device, tokens=256):
            calls.append({"options": options, "dtype": dtype, "device": device})
            if probe is not None:
                probe()

        monkeypatch.setattr(fast, "probe_flex", record)
        return calls

    return use


def triton_out_of_resources() -> None:
    """What a too-large kernel looks like from the outside: Triton's error inside two of inductor's wrappers."""
    try:
        try:
            raise RuntimeError("out of resource: shared memory, Required: 133632, Hardware limit: 101376. "
                               "Reducing block sizes or `num_stages` may help.")
        except RuntimeError as triton:
            raise RuntimeError("backend='inductor' raised:\nCompilationError: see above") from triton
    except RuntimeError as inductor:
        raise Exception("compile failed") from inductor


def test_failed_check_falls_back_to_sdpa_with_one_line(fake_card, capsys):
    calls = fake_card(RTX_3090, probe=triton_out_of_resources)
    assert fast.training_attention(torch.bfloat16) == "sdpa"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "NVIDIA GeForce RTX 3090" in line and "Required: 133632, Hardware limit: 101376" in line
    assert "SDPA" in line and "Traceback" not in line
    assert calls[0]["options"] == fast.SMALL_SMEM_OPTIONS and calls[0]["dtype"] == torch.bfloat16
    assert fast.training_attention(torch.bfloat16) == "sdpa"  # decided once per process: no second check
    assert len(calls) == 1 and capsys.readouterr().out == ""


def test_wrong_results_also_fall_back(fake_card, capsys):
    def wrong():
        raise RuntimeError("flex attention's result differs from SDPA's (relative error 0.31)")

    fake_card(A100, probe=wrong)
    assert fast.training_attention(torch.bfloat16) == "sdpa"
    assert "relative error 0.31" in capsys.readouterr().out


def test_passed_check_registers_the_small_smem_attention(fake_card, capsys):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = fake_card(RTX_3090)
    assert fast.training_attention(torch.float16) == fast.FLEX_SMALL_SMEM
    assert fast.FLEX_SMALL_SMEM in ALL_ATTENTION_FUNCTIONS.valid_keys()
    assert fast.FLEX_SMALL_SMEM in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert calls[0]["dtype"] == torch.float16 and capsys.readouterr().out == ""


def test_roomy_cards_keep_torchs_flex_defaults_and_old_cards_get_sdpa(fake_card):
    calls = fake_card(A100)
    assert fast.training_attention(torch.bfloat16) == "flex_attention"
    assert calls[-1]["options"] == {}
    fake_card(T4)
    assert fast.training_attention(torch.float16) == "sdpa"
    assert len(calls) == 1  # T4: no check at all


def test_the_environment_variable_forces_a_choice(fake_card, monkeypatch):
    calls = fake_card(A100)
    monkeypatch.setenv(fast.ATTENTION_ENV, "flex-small-smem")
    assert fast.training_attention(torch.bfloat16) == fast.FLEX_SMALL_SMEM
    assert calls[-1]["options"] == fast.SMALL_SMEM_OPTIONS
    monkeypatch.setenv(fast.ATTENTION_ENV, "sdpa")
    assert fast.training_attention(torch.bfloat16) == "sdpa"
    monkeypatch.setenv(fast.ATTENTION_ENV, "fastest")
    with pytest.raises(ValueError, match="GLMLORA_ATTENTION='fastest'"):
        fast.training_attention(torch.bfloat16)


def test_cpu_gets_sdpa_without_a_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fast, "probe_flex", lambda *a, **k: pytest.fail("no probe on CPU"))
    assert fast.training_attention() == "sdpa"
    assert fast.speed_up(torch.nn.Linear(2, 2)) == []


def test_failure_reason_finds_the_line_a_learner_can_act_on():
    try:
        triton_out_of_resources()
    except Exception as e:  # noqa: BLE001
        reason = fast._failure_reason(e)
    assert reason.startswith("RuntimeError: out of resource: shared memory, Required: 133632")
    assert fast._failure_reason(ValueError("first line\nsecond")) == "ValueError: first line"


def test_registered_attention_passes_the_options_and_matches_sdpa_on_packed_rows(tiny_original, monkeypatch):
    """The model's attention layers reach flex attention with the chosen options; on two packed examples the logits
    equal SDPA's. (Flex attention runs eagerly here: compiled flex attention needs a GPU.)"""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    from glmlora.chatglm3 import ensure_native, load_model

    seen: list = []

    def eager_flex(query, key, value, training=False, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
    native = ensure_native(tiny_original)
    name = fast.register_flex(fast.SMALL_SMEM_OPTIONS)
    flex_model = load_model(native, dtype=torch.float32, attn_implementation=name)
    sdpa_model = load_model(native, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(24), torch.arange(16)])[None]  # two examples in one packed row
    with torch.no_grad():
        got = flex_model(input_ids=ids, position_ids=positions).logits
        want = sdpa_model(input_ids=ids, position_ids=positions).logits
    assert seen and all(options == fast.SMALL_SMEM_OPTIONS for options in seen)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_cache_moves_under_the_work_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", fast._torch_default_cache_dir())  # torch's own default
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = fast.use_compile_cache()
    assert path == tmp_path / "work" / "compile-cache" and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TRITON_CACHE_DIR"] == str(path / "triton")


def test_compile_cache_keeps_a_directory_the_user_chose(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "my-triton"))
    assert fast.use_compile_cache() == tmp_path / "mine"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "my-triton")


# ---------------------------------------------------------------------------------------------- QLoRA, fp16
def _tiny_model(tiny_original, dtype=torch.float32):
    from glmlora.chatglm3 import ensure_native, load_model

    return load_model(ensure_native(tiny_original), dtype=dtype)


def test_add_lora_prepares_a_4bit_base_without_upcasting_its_16bit_weights(tiny_original):
    """QLoRA's preparation: base frozen, checkpointing with input grads, LoRA in fp32; the embedding and output
    layer stay in the compute dtype (peft's prepare_model_for_kbit_training would make them fp32, +1 GiB at 6B)."""
    from glmlora.lora import lora_config
    from glmlora.training import add_lora

    base = _tiny_model(tiny_original, torch.bfloat16)
    base.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    base.lm_head.weight.requires_grad_(True)  # must be frozen by add_lora, as peft's preparation does
    model = add_lora(base, lora_config())
    assert fast.is_quantized(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert base.is_gradient_checkpointing and not base.config.use_cache


def test_fp16_base_trains_fp32_lora_parameters(tiny_original):
    """The fp16-only card path: fp16 frozen weights, fp32 LoRA parameters (AMP's loss scaler unscales only fp32)."""
    from glmlora.lora import lora_config
    from glmlora.training import add_lora

    model = add_lora(_tiny_model(tiny_original, torch.float16), lora_config())
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.float16}


def test_speed_up_leaves_a_4bit_base_uncompiled(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast, "apply_liger", lambda model, layers=True: True)
    monkeypatch.setattr(fast, "compile_layers", lambda model: pytest.fail("4-bit layers must not be compiled"))
    model = SimpleNamespace(is_loaded_in_4bit=True)
    assert fast.speed_up(model) == ["liger fused linear cross-entropy"]


def test_compiling_the_layers_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast, "apply_liger", lambda model, layers=True: False)
    monkeypatch.setattr(fast, "compile_layers", lambda model: pytest.fail("GLMLORA_COMPILE_LAYERS=0 compiles nothing"))
    monkeypatch.setenv(fast.COMPILE_LAYERS_ENV, "0")
    assert fast.speed_up(SimpleNamespace()) == []


def test_first_training_step_says_it_compiles_once(tiny_original, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    model = _tiny_model(tiny_original)
    fast.announce_first_step(model, "compiling the 2 decoder layers")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    assert capsys.readouterr().out.count("compiling the 2 decoder layers") == 1


def test_build_model_passes_load_in_4bit_and_the_training_dtype(monkeypatch, tmp_path):
    import glmlora.chatglm3 as chatglm3
    import glmlora.training as training
    from glmlora.train import TrainConfig, build_model, parse_config

    assert parse_config({"load_in_4bit": True}, "t.yaml").load_in_4bit is True
    seen: dict = {}
    monkeypatch.setattr(chatglm3, "load_model", lambda native, **kw: seen.update(kw) or "model")
    monkeypatch.setattr(training, "add_lora", lambda model, config, gradient_checkpointing=True: model)
    assert build_model(tmp_path, TrainConfig(load_in_4bit=True, speed_ups=False), True) == "model"
    assert seen["load_in_4bit"] is True and seen["dtype"] == torch.float32 and seen["attn_implementation"] == "sdpa"


def test_4bit_without_cuda_says_what_to_do(tiny_original):
    from glmlora.chatglm3 import ensure_native, load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_model(ensure_native(tiny_original), load_in_4bit=True)
