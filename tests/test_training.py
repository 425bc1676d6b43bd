"""Training with the course's factories: the tiny model really learns, resumes, and plots its loss."""

from __future__ import annotations

import torch
from transformers import Trainer

from glmlora import load_model, load_tokenizer
from glmlora.chatglm3 import ensure_native
from glmlora.data import load_records, sample_data_path
from glmlora.formatting import IGNORE, tokenize_records
from glmlora.generate import GenerationSettings, chat
from glmlora.lora import lora_config
from glmlora.training import (add_lora, collator, last_checkpoint, loss_history, plot_loss, precision_flags,
                              read_log_history, trainable_summary, training_arguments)

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=96)


def test_finetuned_tiny_model_reproduces_memorised_answers(memorised):
    model, tok, records, log, _ = memorised
    losses = [loss for _, loss in loss_history(log)["train"]]
    assert losses[-1] < 0.2 * losses[0]
    for r in records:
        reply, _ = chat(model, tok, r["input"], system=r.get("system") or None, settings=GREEDY)
        assert reply == r["output"].strip()


def test_lora_parameters_are_fp32_on_a_half_precision_base(tiny_original):
    native = ensure_native(tiny_original)
    model = add_lora(load_model(native, dtype=torch.float16), lora_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    assert "trainable parameters:" in trainable_summary(model)


def test_checkpointing_with_input_grads_backpropagates(tiny_original):
    native = ensure_native(tiny_original)
    model = add_lora(load_model(native, dtype=torch.float32), lora_config(), gradient_checkpointing=True)
    model.train()
    ids = torch.randint(3, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A starts with zero grad (B = 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_collator_pads_right_with_ignored_labels(tiny_original):
    tok = load_tokenizer(ensure_native(tiny_original))
    batch = collator(tok, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                 {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [9] + [0] * 7
    assert batch["labels"][1].tolist() == [9] + [IGNORE] * 7
    assert batch["attention_mask"][1].tolist() == [1] + [0] * 7


def test_training_arguments_defaults_and_overrides(tmp_path):
    args = training_arguments(tmp_path, num_train_epochs=1)
    assert args.gradient_checkpointing and args.train_sampling_strategy == "random"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (1, 1, 1)
    # full precision on CPU; on CUDA what the card supports (bf16, else fp16 AMP): the same rule as lesson 05
    assert (args.bf16, args.fp16) == (precision_flags()["bf16"], precision_flags()["fp16"])
    if not torch.cuda.is_available():
        assert not args.fp16 and not args.bf16
    assert args.report_to in ([], "none", ["none"]) or not args.report_to


def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_original, tmp_path):
    native = ensure_native(tiny_original)
    tok = load_tokenizer(native)
    records = load_records(sample_data_path())[:16]
    ds, _ = tokenize_records(records, tok, max_length=128)

    def trainer(max_steps):
        torch.manual_seed(0)
        model = add_lora(load_model(native, dtype=torch.float32), lora_config())
        args = training_arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                  max_steps=max_steps, save_steps=3, logging_steps=1, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=ds, data_collator=collator(tok),
                       processing_class=tok)

    trainer(3).train()  # "interrupted" after the checkpoint at step 3
    assert last_checkpoint(tmp_path).endswith("checkpoint-3")
    resumed = trainer(6)
    resumed.train(resume_from_checkpoint=last_checkpoint(tmp_path))
    steps = [s for s, _ in loss_history(resumed.state.log_history)["train"]]
    assert resumed.state.global_step == 6 and steps[-1] == 6 and 4 in steps
    assert len(read_log_history(tmp_path)) >= 6


def test_trainer_checkpoints_every_nth_layer_as_the_arguments_say(tiny_original, tmp_path):
    """``checkpoint_every`` reaches the decoder layers through Trainer (which enables checkpointing again at the
    start of ``train()``): with 2, every 2nd layer recomputes and the others keep their activations."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from glmlora.profiles import select_profile
    from glmlora.train import TrainConfig, make_arguments

    native = ensure_native(tiny_original)
    tok = load_tokenizer(native)
    ds, _ = tokenize_records(load_records(sample_data_path())[:4], tok, max_length=128)
    for every in (1, 2):
        cfg = TrainConfig(profile="tiny", checkpoint_every=every,
                          training={"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no",
                                    "eval_strategy": "no", "disable_tqdm": True})
        args = make_arguments(cfg, select_profile("tiny"), tmp_path)
        assert args.gradient_checkpointing_kwargs == {"use_reentrant": False, "every_n_layers": every}
        model = add_lora(load_model(native, dtype=torch.float32), lora_config())
        Trainer(model=model, args=args, train_dataset=ds, data_collator=collator(tok), processing_class=tok).train()
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(flags) >= 2 and flags == [i % every == 0 for i in range(len(flags))]


def test_loss_plot_is_written(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]
    fig = plot_loss(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train loss", "eval loss"]
