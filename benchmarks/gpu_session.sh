#!/usr/bin/env bash
# GPU-machine runs (full-size random-weight ChatGLM3-6B). Usage: bash benchmarks/gpu_session.sh STAGE...
#   build      the model (original layout + converted), once; run it first when stages run side by side on
#              different GPUs (CUDA_VISIBLE_DEVICES per stage), so that they do not build it at the same time
#   train      benchmarks/train_bench.py (original recipe vs glmlora defaults)
#   chat       benchmarks/chat_bench.py (decode speed, batched generation)
#   scaling    benchmarks/multi_gpu_bench.py: 1 GPU vs DDP vs FSDP on ${GPUS:-2} GPUs (the first of
#              CUDA_VISIBLE_DEVICES); results in $OUT/${SCALING_JSON:-multi_gpu_bench.json}
#   notebooks  notebooks/zh/04-07 (or $NOTEBOOKS, paths) under nbval with GLMLORA_PROFILE=full-random, time and
#              peak memory each; notebook 07's numbers (evaluation.json) come back in $OUT
# Issue 13's stages (kernels per card, fp16, QLoRA, card memory caps, first reply): benchmarks/gpu_issue13.sh
# Wheels the machine lacks travel in .whl/ (or the folder named by WHEELS), extra benchmark data in .gpu/data/ (both
# git-ignored). The GPU image lacks (python 3.12 wheels, `pip download --no-deps`): datasets dill multiprocess peft
# liger-kernel pydantic pydantic-core annotated-types typing-inspection (+ bitsandbytes for QLoRA); for the notebooks
# also nbval nbformat nbclient jupyter_client jupyter_core traitlets ipykernel ipython jedi parso prompt_toolkit wcwidth
# decorator pexpect ptyprocess stack_data executing asttokens pure_eval matplotlib-inline ipython-pygments-lexers
# pyzmq tornado comm debugpy nest_asyncio platformdirs fastjsonschema jsonschema jsonschema-specifications referencing
# rpds-py ipywidgets widgetsnbextension jupyterlab_widgets rouge-chinese nltk jieba (a py3 wheel built with pip wheel);
# about 43 MB, under the 64 MiB a call may carry. bitsandbytes' wheel (43 MB) holds a library per CUDA version: the
# GPU image's CUDA 13 needs only libbitsandbytes_cuda130/132.so, so drop the others (`zip -d WHEEL
# 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_cuda128.so' 'bitsandbytes/libbitsandbytes_rocm*'`,
# 7.4 MB left) and one folder carries everything. GLMLORA_CAP_GIB=23.2 caps the notebooks' kernels at that much GPU memory (an emulated card:
# benchmarks/emulate/sitecustomize.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GLMLORA_WORKDIR=${GLMLORA_WORKDIR:-/tmp/glmlora-work} GLMLORA_MODEL_CACHE=/tmp/models
MODEL=$GLMLORA_MODEL_CACHE/chatglm3-6b-random
# once per wheel folder (a warm machine keeps /tmp/site between calls; another folder adds its wheels)
if [ ! -e "/tmp/site/.from-$(basename "${WHEELS:-.whl}")" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
    && touch "/tmp/site/.from-$(basename "${WHEELS:-.whl}")"
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
DATA=$(ls .gpu/data/*.jsonl 2>/dev/null)
GPU=${CUDA_VISIBLE_DEVICES:-0}; GPU=${GPU%%,*}  # notebooks: the GPU whose memory nvidia-smi reports
for stage in "$@"; do
  case $stage in
    build) GLMLORA_PROFILE=full-random python3 -c "from glmlora.pipeline import ensure_native_model as e; \
from glmlora.profiles import select_profile as s; print('model:', e(s()))" 2>&1 | grep -v "it/s\]" ;;
    train) python3 benchmarks/train_bench.py --model "$MODEL" --data $DATA --variants "${VARIANTS:-a,e}" --json "$OUT/train_bench.json" 2>&1 | grep -v "it/s\]" ;;
    scaling)
      python3 -c "from glmlora.data import sample_data_path; print(sample_data_path())" | xargs cat $DATA > /tmp/scaling.jsonl
      python3 benchmarks/multi_gpu_bench.py --gpus "${GPUS:-2}" --steps "${STEPS:-40}" --data /tmp/scaling.jsonl \
        --workdir "/tmp/scaling-${SCALING_JSON:-all}" --json "$OUT/${SCALING_JSON:-multi_gpu_bench.json}" ${SCALING_ARGS:-} 2>&1 | grep -v "it/s\]" ;;
    chat) python3 benchmarks/chat_bench.py --model "$MODEL" --json "$OUT/${CHAT_JSON:-chat_bench.json}" ${CHAT_ARGS:-} 2>&1 | grep -v "it/s\]" ;;
    notebooks)
      python3 -m ipykernel install --prefix /tmp/kernel --name python3 >/dev/null && export JUPYTER_PATH=/tmp/kernel/share/jupyter
      [ -n "${GLMLORA_CAP_GIB:-}" ] && export PYTHONPATH=$PWD/benchmarks/emulate:$PYTHONPATH
      for nb in ${NOTEBOOKS:-notebooks/zh/0[4-7]*.ipynb}; do
        nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/mem.log & SMI=$!
        start=$(date +%s)
        log="$OUT/nbval_$(basename "$(dirname "$nb")")_$(basename "$nb" .ipynb).log"
        (cd "$(dirname "$nb")" && GLMLORA_PROFILE=${NB_PROFILE:-full-random} timeout "${NB_TIMEOUT:-400}" python3 -m pytest -q \
          -p no:cacheprovider --nbval-lax --nbval-current-env "$(basename "$nb")" > "$log" 2>&1; tail -3 "$log")
        kill $SMI; peak=$(sort -n /tmp/mem.log | tail -1)
        echo "NOTEBOOK $(basename "$nb") $(( $(date +%s) - start )) s, peak GPU memory used ${peak} MiB (nvidia-smi)"
      done
      find "$GLMLORA_WORKDIR" -name evaluation.json -exec cp {} "$OUT/" \; ;;  # notebook 07's numbers
  esac
done
