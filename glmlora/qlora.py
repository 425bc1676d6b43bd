"""After QLoRA training (lesson 05 with ``LOAD_IN_4BIT = True``): chat from the 4-bit base, export from a 16-bit one.

QLoRA trains a LoRA adapter on top of a base whose weights were rounded to 4-bit NF4 while loading. The adapter
is an ordinary one (fp32 ``A`` and ``B`` matrices, a few MB) and fits the base in any precision:

* **chat** on the small card: the 4-bit base plus the adapter, *unmerged* — exactly the model that was trained;
* **export** (a merged model for vLLM or plain transformers): merge into a **16-bit** copy of the base. Merging
  into the 4-bit weights would round ``W + (alpha/r) B A`` to NF4 again: most of the small update is lost in that
  rounding, and the result is neither the trained model nor the 16-bit one. The 16-bit copy needs 12.5 GB of
  memory for a moment — on the CPU (the default here) where the GPU is too small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .chatglm3 import load_model
from .tokenizer import ChatGLM3Tokenizer, load_tokenizer


def load_for_chat(native: str | Path, adapter_dir: str | Path, load_in_4bit: bool = True,
                  dtype: torch.dtype | None = None) -> tuple[Any, ChatGLM3Tokenizer]:
    """``(model, tokenizer)``: the base (4-bit NF4 by default, on this GPU) with the adapter, unmerged, in eval mode.

    ``glmlora.generate.chat(model, tokenizer, ...)`` answers with it; ``dtype`` is the compute dtype (default: bf16
    where the GPU has it, else fp16).
    """
    from peft import PeftModel

    from .training import training_dtype

    base = load_model(native, dtype=dtype or training_dtype(), load_in_4bit=load_in_4bit)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.eval(), load_tokenizer(native)


def merged_16bit(native: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                 device_map: Any = "cpu") -> Any:
    """The adapter merged into a 16-bit copy of the base: a plain ``GlmForCausalLM`` to export or serve.

    Pass the result to ``glmlora.export.export_merged(model, tokenizer, out_dir)``. ``device_map="cpu"`` needs
    about 12.5 GB of host memory for the 6B model; ``"cuda"`` is faster where the card holds it (24 GB).
    """
    from peft import PeftModel

    base = load_model(native, dtype=dtype, device_map=device_map)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
