"""glmlora.train: a config file is checked (file and key named), and training runs as a real process —
``python -m``, ``accelerate launch`` and ``torchrun`` with two processes (DDP over gloo) — and resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from glmlora.lora import lora_config
from glmlora.train import (WARMUP_STEPS, ConfigError, RunResult, load_config, main, parse_config, parse_summary,
                           resolve_profile, resume_checkpoint, step_clock)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- config
def test_default_config_gives_lesson_05s_defaults():
    cfg = load_config(REPO / "configs" / "train_default.yaml")
    ours, lesson = lora_config(**cfg.lora), lora_config()
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        assert getattr(ours, name) == getattr(lesson, name), name
    assert cfg.training == {} and cfg.resume == "auto"
    assert cfg.profile is cfg.pack_tokens is cfg.max_length is cfg.output_dir is cfg.adapter_dir is None


def test_an_empty_file_means_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "empty.yaml", ""))
    assert cfg.lora == {} and cfg.training == {} and cfg.resume == "auto"


@pytest.mark.parametrize("text, line, expected", [
    ("lora:\n  r: 8\n  rank: 4\n", 3, "unknown key 'lora.rank' in section 'lora'; known keys: alpha, dropout, r"),
    ("training:\n  num_train_epochs: 1\n  learnin_rate: 0.1\n", 3,
     "unknown key 'training.learnin_rate' in section 'training' (did you mean 'learning_rate'?)"),
    ("profile: tiny\n\npack_tokens: 1.5\n", 3, "key 'pack_tokens' must be a valid integer, got float 1.5"),
    ("training:\n  save_steps: 0\n", 2,
     "key 'training.save_steps' must be a whole number of steps >= 1, or a fraction"),
])
def test_config_errors_name_the_file_the_line_and_the_key(tmp_path, text, line, expected):
    """More cases, through the command line, in test_bad_inputs.py."""
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and expected in str(info.value)


def test_checkpoints_every_fraction_of_the_run_are_valid(tmp_path):
    """Lesson 05 saves every quarter of the run (save_steps 0.25): fractions in (0, 1) stay valid."""
    cfg = load_config(write(tmp_path / "q.yaml", "training:\n  save_steps: 0.25\n  eval_steps: 0.5\n"
                                                  "  logging_steps: 10\n  max_steps: 8\n"))
    assert cfg.training == {"save_steps": 0.25, "eval_steps": 0.5, "logging_steps": 10, "max_steps": 8}


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.yaml'}: no such config file")):
        load_config(tmp_path / "nope.yaml")


def test_yaml_exponent_without_a_dot_is_read_as_a_float(tmp_path):
    cfg = load_config(write(tmp_path / "lr.yaml", "training:\n  learning_rate: 2e-4\n  warmup_steps: 0.1\n"))
    assert cfg.training == {"learning_rate": 2e-4, "warmup_steps": 0.1}


def test_checks_that_need_the_profile_or_the_disk_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="f.yaml: key 'max_length' \\(2048\\) must not exceed 'pack_tokens'"):
        resolve_profile(parse_config({"profile": "tiny", "max_length": 2048, "pack_tokens": 1024}, "f.yaml"))
    with pytest.raises(ConfigError, match="f.yaml: key 'resume': .* cannot be resumed from: not a directory"):
        resume_checkpoint(parse_config({"resume": str(tmp_path / "gone")}, "f.yaml"), tmp_path)
    assert resume_checkpoint(parse_config({"resume": "never"}, "f.yaml"), tmp_path) is None
    assert resume_checkpoint(parse_config({}, "f.yaml"), tmp_path / "no-run-yet") is None


def test_the_command_line_reports_config_errors_with_exit_status_2(tmp_path, capsys):
    path = write(tmp_path / "bad.yaml", "lora:\n  alpha: high\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config error: {path}:2: key 'lora.alpha' must be a valid integer, got str 'high'" in err


def test_the_documented_default_config_names_only_what_the_loader_reads():
    """The data format in the comments: lesson 03's fields (system, input, output, or messages); no `history`,
    which the loader rejects (with a hint to write messages)."""
    text = (REPO / "configs" / "train_default.yaml").read_text(encoding="utf-8")
    assert "history" not in text and "messages" in text


def test_training_section_may_change_every_default(tmp_path):
    from glmlora.train import make_arguments

    cfg = parse_config({"profile": "tiny", "training": {"eval_strategy": "no", "save_strategy": "no"}}, "f.yaml")
    args = make_arguments(cfg, resolve_profile(cfg), tmp_path)
    assert (args.eval_strategy, args.save_strategy) == ("no", "no")
    default = parse_config({"profile": "tiny"}, "f.yaml")
    assert make_arguments(default, resolve_profile(default), tmp_path).eval_strategy == "epoch"


def test_a_data_file_is_checked_when_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"f.yaml: key 'data': no file {tmp_path / 'mine.jsonl'}")):
        parse_config({"data": str(tmp_path / "mine.jsonl")}, "f.yaml")
    write(tmp_path / "mine.jsonl", "")
    assert parse_config({"data": str(tmp_path / "mine.jsonl")}, "f.yaml").data == str(tmp_path / "mine.jsonl")


def test_bad_records_in_the_data_file_stop_the_run_naming_file_line_and_field(tmp_path, capsys, monkeypatch):
    good = json.dumps({"input": "睡不着怎么办？", "output": "可以先试着固定起床时间。"}, ensure_ascii=False)
    data = write(tmp_path / "mine.jsonl", f"{good}\n{good}\n" + json.dumps({"input": "只有问题"}) + "\n")
    config = write(tmp_path / "train.yaml", yaml.safe_dump({"profile": "tiny", "data": str(data)}))
    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("GLMLORA_MODEL_CACHE", str(tmp_path / "models"))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data error: 1 problem(s)" in err and f"{data}:3" in err and "output" in err


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_steady_speed_leaves_out_warm_up_evaluation_and_saving(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("glmlora.train.time.perf_counter", clock)
    result = RunResult("tiny", 0, 0, 1, [], 0.0, 1000, Path("a"), None)
    callback = step_clock(result)
    # steps end at 10, 11, 12 (warm-up: slow), then every second; an evaluation of 5 s after the 5th step,
    # a checkpoint save of 3 s after the last one (outside the window)
    ends = [10, 11, 12, 13, 14, 20, 21, 22]
    for i, end in enumerate(ends):
        clock.t = end
        callback.on_step_end(None, None, None)
        if i == 4:
            clock.t = 19
            callback.on_evaluate(None, None, None)
    clock.t = 25
    callback.on_save(None, None, None)
    result.global_step, result.seconds = len(ends), 30.0
    assert WARMUP_STEPS == 3 and result.step_times == ends and result.pause_seconds == 5.0
    # window: end of step 4 (t=13) to end of step 8 (t=22) = 9 s, minus 5 s of evaluation: 4 steps in 4 s
    assert result.steady_tokens_per_second == pytest.approx(1000.0)
    assert result.tokens_per_second == pytest.approx(8 * 1000 / 30)
    summary = parse_summary(result.summary())
    assert summary["tokens_per_second"] == 1000 and summary["overall_tokens_per_second"] == 267
    assert summary["first_loss"] is None and summary["steady"]

    short = RunResult("tiny", 4, 0, 1, [(1, 9.5), (4, 9.1)], 2.0, 1000, Path("a"), None, step_times=[1.0, 2, 3, 4])
    assert short.steady_tokens_per_second is None  # one step after the warm-up: no interval to time
    assert "2,000 tokens/s overall (too few steps to leave out the warm-up;" in short.summary()
    parsed = parse_summary(short.summary())
    assert (parsed["tokens_per_second"], parsed["steady"], parsed["last_loss"]) == (2000, False, 9.1)


# ---------------------------------------------------------------------------------------------- accelerate configs
def launch_env(config_file: Path) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file`` makes of a file: its parsed arguments and the workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "glmlora.train"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_ddp_config_is_multi_gpu_bf16():
    args, env = launch_env(REPO / "configs" / "accelerate_ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp
    assert args.num_processes == 2 and args.num_machines == 1 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_keys_are_accelerates_and_reach_the_workers():
    from accelerate.commands.launch import launch_command_parser

    path = REPO / "configs" / "accelerate_fsdp.yaml"
    known = {a.dest for a in launch_command_parser()._actions}
    fsdp = yaml.safe_load(path.read_text())["fsdp_config"]
    assert set(fsdp) <= known, f"keys accelerate would silently ignore: {sorted(set(fsdp) - known)}"
    args, env = launch_env(path)
    assert args.use_fsdp
    assert {k: env[k] for k in ("FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_AUTO_WRAP_POLICY",
                                "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_USE_ORIG_PARAMS", "FSDP_STATE_DICT_TYPE",
                                "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_SYNC_MODULE_STATES",
                                "FSDP_ACTIVATION_CHECKPOINTING")} == {
        "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "GlmDecoderLayer,Embedding", "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def test_fsdp2_candidate_config_is_read_as_fsdp2_by_accelerate():
    """The benchmark candidate (benchmarks/configs): every key accelerate's, and the workers get FSDP2 settings."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin

    path = REPO / "benchmarks" / "configs" / "accelerate_fsdp2_candidate.yaml"
    known = {a.dest for a in launch_command_parser()._actions}
    assert set(yaml.safe_load(path.read_text())["fsdp_config"]) <= known
    args, env = launch_env(path)
    assert args.use_fsdp and env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    os_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    old = {k: os.environ.get(k) for k in os_env}
    os.environ.update(os_env)
    try:  # the plugin the Trainer will build from that environment: FSDP2, resharding, no FSDP1-only options
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.forward_prefetch is None and plugin.use_orig_params is None
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fsdp_units_are_decoder_layers_the_embedding_and_lora_layers(tiny_original, monkeypatch):
    """The units the shipped FSDP file gives a LoRA model under Trainer (which installs peft's wrap policy, fed the
    class names through the environment accelerate launch sets): every decoder layer, the input embedding and each
    LoRA matrix on its own; the output layer and the final norm stay in the root unit."""
    from peft.utils.other import fsdp_auto_wrap_policy

    from glmlora.chatglm3 import ensure_native, load_model
    from glmlora.training import add_lora

    _, env = launch_env(REPO / "configs" / "accelerate_fsdp.yaml")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", env["FSDP_TRANSFORMER_CLS_TO_WRAP"])
    model = add_lora(load_model(ensure_native(tiny_original)), lora_config())
    policy = fsdp_auto_wrap_policy(model)
    units = {name for name, m in model.named_modules() if name and policy(module=m, recurse=False, nonwrapped_numel=0)}
    layers = {f"base_model.model.model.layers.{i}" for i in range(model.config.num_hidden_layers)}
    lora = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * len(layers) * len(lora_config().target_modules)  # A and B of every target
    assert units == layers | {"base_model.model.model.embed_tokens"} | lora
    assert not {"base_model.model.lm_head", "base_model.model.model.norm"} & units


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """One tiny model for all runs of this module (the first run builds it)."""
    return tmp_path_factory.mktemp("models")


def small_config(workdir: Path, max_steps: int) -> Path:
    return write(workdir / "train.yaml", yaml.safe_dump({
        "profile": "tiny",
        "training": {"max_steps": max_steps, "save_steps": 2, "logging_steps": 1, "disable_tqdm": True,
                     "eval_strategy": "no"}}))


def launch(command: list[str], workdir: Path, model_cache: Path, status: int = 0) -> str:
    """Run a launcher in a child process with a private work directory; its output, or a failure showing it."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_KEYS and not k.startswith(("ACCELERATE_", "FSDP_"))}
    # One thread per process: no oversubscribed cores under torchrun, and the same arithmetic under every launcher.
    env.update(GLMLORA_WORKDIR=str(workdir), GLMLORA_MODEL_CACHE=str(model_cache), GLMLORA_PROFILE="tiny",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-4000:]
    return output


def accelerate_cpu(config: Path) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
            "-m", "glmlora.train", "--config", str(config)]


def assert_trained(workdir: Path, output: str, steps: int, world_size: int = 1) -> None:
    """Adapter (with trained weights), tokenizer and loss curve on disk; the summary line says what ran."""
    adapter, run_dir = workdir / "adapters" / "tiny", workdir / "runs" / "tiny"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.model"):
        assert (adapter / name).is_file(), name
    lora_b = [t for k, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means it trained
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = parse_summary(output)
    assert (summary["profile"], summary["steps"], summary["world_size"]) == ("tiny", steps, world_size)
    assert summary["tokens_per_second"] > 0 and summary["last_loss"] > 0
    assert re.search(r"SUMMARY train: .*loss \d+\.\d+ -> \d+\.\d+", output)


def adapter_weights(workdir: Path) -> dict:
    return load_file(workdir / "adapters" / "tiny" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def python_m_run(tmp_path_factory, model_cache) -> tuple[Path, list[str], str, dict]:
    """``python -m glmlora.train`` for 4 steps, checkpoints at 2 and 4: (work dir, command, output, adapter weights)."""
    workdir = tmp_path_factory.mktemp("python-m")
    command = [sys.executable, "-m", "glmlora.train", "--config", str(small_config(workdir, 4))]
    output = launch(command, workdir, model_cache)
    return workdir, command, output, adapter_weights(workdir)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(t, b[k]) for k, t in a.items())


def test_python_m_trains_and_writes_adapter_and_loss_curve(python_m_run, model_cache):
    workdir, command, output, weights = python_m_run
    assert_trained(workdir, output, steps=4)
    assert "resuming" not in output
    # the bundled data has dialogues longer than the tiny profile's 512 tokens: windows train every reply token
    coverage = re.search(r"train data: (\d+) examples in -> (\d+) windows \((\d+) long dialogues split\); "
                         r"reply tokens trained ([\d,]+) / ([\d,]+) \(100\.0 %\); 0 turns truncated", output)
    assert coverage and int(coverage[2]) > int(coverage[1]) and coverage[4] == coverage[5], output[-3000:]

    output = launch(command, workdir, model_cache)  # the same command again: the run is finished
    assert "is already at step 4 (max_steps 4): nothing to train" in output
    assert not (workdir / "runs" / "tiny" / "checkpoint-5").exists()
    assert same_weights(adapter_weights(workdir), weights)


def test_accelerate_launch_trains_and_a_second_run_resumes(tmp_path, model_cache, python_m_run):
    output = launch(accelerate_cpu(small_config(tmp_path, 4)), tmp_path, model_cache)
    assert_trained(tmp_path, output, steps=4)
    assert same_weights(adapter_weights(tmp_path), python_m_run[3])  # the launcher changes nothing: same adapter
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint-4"
    assert checkpoint.is_dir()

    output = launch(accelerate_cpu(small_config(tmp_path, 6)), tmp_path, model_cache)  # resume: auto
    assert f"resuming from {checkpoint}" in output
    assert "6 steps, resumed at step 4" in output
    assert_trained(tmp_path, output, steps=6)
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]  # the log goes on


#: ``python -m glmlora.train`` that is killed (SIGKILL) while writing checkpoint-4: the adapter is saved, the
#: optimizer state half written, no trainer state yet — what a power cut or an out-of-memory kill leaves.
KILLED_WHILE_SAVING = """
import os, signal, sys
from transformers import Trainer

save = Trainer._save_optimizer_and_scheduler

def save_and_die(self, output_dir):
    save(self, output_dir)
    if self.state.global_step == 4:
        path = os.path.join(output_dir, "optimizer.pt")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._save_optimizer_and_scheduler = save_and_die
from glmlora.train import main
sys.exit(main(["--config", sys.argv[1]]))
"""


def test_a_kill_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, model_cache, python_m_run):
    """resume: auto passes over the half-written checkpoint-4, continues from checkpoint-2, and ends with exactly
    the adapter of the uninterrupted run of the same 4 steps."""
    config = small_config(tmp_path, 4)
    launch([sys.executable, "-c", KILLED_WHILE_SAVING, str(config)], tmp_path, model_cache, status=-9)
    broken = tmp_path / "runs" / "tiny" / "checkpoint-4"
    assert (broken / "adapter_model.safetensors").is_file() and not (broken / "trainer_state.json").exists()
    assert not (tmp_path / "adapters" / "tiny").exists()

    output = launch([sys.executable, "-m", "glmlora.train", "--config", str(config)], tmp_path, model_cache)
    assert f"skipping {broken}: no trainer_state.json" in output
    assert f"resuming from {tmp_path / 'runs' / 'tiny' / 'checkpoint-2'}" in output
    assert "4 steps, resumed at step 2" in output
    assert same_weights(adapter_weights(tmp_path), python_m_run[3])  # bit-identical to the uninterrupted run


def test_a_bad_config_stops_the_real_command_with_one_line_and_no_traceback(tmp_path, model_cache):
    config = write(tmp_path / "bad.yaml", "profile: tiny\ntraining:\n  learning_rate: -1.0e-4\n")
    output = launch([sys.executable, "-m", "glmlora.train", "--config", str(config)], tmp_path / "work",
                    model_cache, status=2)
    assert output.strip() == f"config error: {config}:3: key 'training.learning_rate' must be greater than 0, " \
                             f"got float -0.0001"
    work = tmp_path / "work"
    assert not work.exists() or list(work.rglob("*")) == []  # no split, run or adapter


def test_a_data_set_too_small_to_split_trains_without_evaluation(tmp_path, monkeypatch, capsys):
    """Five records leave the 10 % validation set empty: said, and evaluation switched off (instead of a crash
    in the evaluation loop after training)."""
    import glmlora.train as train

    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    monkeypatch.setenv("GLMLORA_WORKDIR", str(tmp_path / "work"))
    seen = {}
    monkeypatch.setattr(train, "make_trainer", lambda cfg, profile, args: seen.setdefault("args", args))
    monkeypatch.setattr(train, "train_and_save", lambda trainer, result, image: None)
    train.run(parse_config({"profile": "tiny", "data": str(data)}, "f.yaml"))
    assert seen["args"].eval_strategy == "no"
    assert "validation set empty: 5 record(s) are too few for a 10% validation split; evaluation is skipped" in \
        capsys.readouterr().out


def test_torchrun_two_processes_train_one_adapter(tmp_path, model_cache):
    """Real data parallelism on the CPU (gloo): two ranks, one set of files written by rank 0."""
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "glmlora.train",
               "--config", str(small_config(tmp_path, 2))]
    output = launch(command, tmp_path, model_cache)
    assert_trained(tmp_path, output, steps=2, world_size=2)
    assert output.count("SUMMARY train:") == 1  # printed by rank 0 only
    assert "(host, largest of 2 ranks)" in output
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
