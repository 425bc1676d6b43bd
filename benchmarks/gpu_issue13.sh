#!/usr/bin/env bash
# Issue 13's GPU measurements in three device calls, each planned for well under 9 minutes on one H100 / H200
# (every call starts on a fresh machine, so each builds the full-size random model first).
#   bash benchmarks/gpu_issue13.sh call1   (a) flex kernels per card + (d) 24/20 GB bf16 LoRA, compiled and not
#   bash benchmarks/gpu_issue13.sh call2   (c, d) 12/10 GB QLoRA, chat from 4 bits, merging + (f) fair baseline
#   bash benchmarks/gpu_issue13.sh call3   (b, d) 16 GB bf16 vs fp16-only (T4) + (e) first reply cold / warm
# Needs .whl/ (datasets, dill, multiprocess, liger-kernel, bitsandbytes, peft) and .gpu/data/cpsycound_singleturn.jsonl
# (a copy of ../shared/data/cpsycound_singleturn.jsonl), both git-ignored: name both in the call's carry list.
# Emulated cards: memory = a per-process cap (the card's reported GiB - 0.5 GiB of CUDA context); attention = what
# glmlora.fast.training_attention() picks on that card (GLMLORA_ATTENTION: flex-small-smem on sm86/sm89, SDPA on
# the T4). Optional stages: peft (QLoRA with peft's prepare_model_for_kbit_training); lora_cold, lora_warm (the first
# reply through an unmerged LoRA adapter); old_cold, old_warm (the first reply with glmlora's previous decode step).
# TINY=1 PY=.venv/bin/python: the same plumbing with the tiny model on a CPU (no build, 2 steps, GPU-only stages skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:?usage: bash benchmarks/gpu_issue13.sh call1|call2|call3|run STAGE...}
shift
case $CALL in
  call1) STAGE_LIST="flex d24 eager" ;;
  call2) STAGE_LIST="qlora check fair" ;;
  call3) STAGE_LIST="bf16 fp16 cold warm" ;;
  run) STAGE_LIST="$*" ;;
  *) echo "unknown call $CALL (call1, call2, call3 or run STAGE...)"; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/$CALL.log") 2>&1
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
if [ "${TINY:-0}" = 1 ]; then
  export GLMLORA_WORKDIR=${GLMLORA_WORKDIR:-/tmp/issue13-work} GLMLORA_PROFILE=tiny
  X="--tiny"; STEPS="--steps 2"; MODEL=$GLMLORA_WORKDIR/tiny-bench; BENCH="--size tiny --steps 2 --warmup 1"
else
  export GLMLORA_MODEL_CACHE=/tmp/models GLMLORA_WORKDIR=/tmp/issue13-work
  bash benchmarks/gpu_session.sh build || exit 1   # installs .whl into /tmp/site, prints versions, builds the model
  export PYTHONPATH=/tmp/site:$PWD
  X=""; STEPS="--steps 12"; MODEL=$GLMLORA_MODEL_CACHE/chatglm3-6b-random; BENCH="--steps 12"
fi
echo "ready after $(( $(date +%s) - T0 )) s"
DATA=/tmp/issue13.jsonl
$PY -c "from glmlora.data import sample_data_path; print(sample_data_path())" | xargs cat .gpu/data/*.jsonl > $DATA
RUN="$PY benchmarks/issue13.py"
SMALL=flex-small-smem   # what an RTX 3090 / 4090 / 3060 / 3080 / 4060 Ti gets (101,376 B of shared memory per block)

stage() {  # stage NAME SECONDS COMMAND...: run it, never longer than SECONDS nor past the call's BUDGET
  local name=$1 limit=$2; shift 2
  if [ "${BUDGET:-0}" -gt 0 ]; then
    local left=$(( BUDGET - ($(date +%s) - T0) - 15 ))
    if [ "$left" -lt 45 ]; then echo; echo "=== $name SKIPPED: ${left} s left of the call's ${BUDGET} s"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo; echo "=== $name (limit ${limit} s, at $(( $(date +%s) - T0 )) s)"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s\]"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "=== $name FAILED or timed out (exit $rc)"
}

one() {  # one named stage (a: kernels, b: fp16, c: QLoRA, d: card caps, e: first reply, f: fair baseline)
  case $1 in
    flex) [ -z "$X" ] && stage flex 240 $RUN flex --json "$OUT/a_flex.json" ;;
    d24) stage d24 240 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --label "24+20 GB bf16 LoRA (20 GB cap)" \
      --gpu-gib 19.5 --data $DATA --json "$OUT/d_24_20gb.json" ;;
    eager)  # does compiling the layers pay? the same run with eager layers: first-step time vs steady speed
      stage eager 180 env GLMLORA_ATTENTION=$SMALL GLMLORA_COMPILE_LAYERS=0 $RUN train $X $STEPS \
        --label "24+20 GB bf16 LoRA, layers not compiled" --gpu-gib 19.5 --data $DATA --json "$OUT/d_24_20gb_eager.json" ;;
    qlora) stage qlora 240 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --label "12+10 GB QLoRA (10 GB cap)" \
      --gpu-gib 9.8 --data $DATA --json "$OUT/c_qlora_10gb.json" ;;
    check)
      local adapter
      adapter=$($PY -c "import json; print(json.load(open('$OUT/c_qlora_10gb.json'))['adapter_dir'])" 2>/dev/null)
      stage check 240 $RUN qlora-check $X --adapter "$adapter" --json "$OUT/c_qlora_check.json" ;;
    fair) stage fair 300 $PY benchmarks/train_bench.py --model "$MODEL" --data .gpu/data/*.jsonl --variants a,e $BENCH \
      --work /tmp/issue13-bench --json "$OUT/f_train_bench.json" ;;
    peft) stage peft 200 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --gpu-gib 9.8 --kbit-prepare peft \
      --label "QLoRA, peft prepare_model_for_kbit_training" --data $DATA --json "$OUT/c_qlora_peft_prepare.json" ;;
    bf16) stage bf16 240 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --label "16 GB bf16 LoRA (4060 Ti cap)" \
      --gpu-gib 15.6 --data $DATA --json "$OUT/b_bf16_16gb.json" ;;
    fp16) stage fp16 240 env GLMLORA_ATTENTION=sdpa $RUN train $X $STEPS --label "16 GB fp16-only (T4 cap)" --gpu-gib 14.6 \
      --fp16 --data $DATA --json "$OUT/b_fp16_t4.json" ;;
    cold) rm -rf /tmp/issue13-chat   # a fresh work directory: nothing compiled yet
      stage cold 200 env GLMLORA_WORKDIR=/tmp/issue13-chat $RUN chat $X --label "first reply, cold (new cache)" \
        --json "$OUT/e_cold.json" ;;
    warm) stage warm 120 env GLMLORA_WORKDIR=/tmp/issue13-chat $RUN chat $X ${CHAT_ARGS:-} --label "first reply, warm (cache kept)" \
      --json "$OUT/e_warm.json" ;;
    keep24)  # memory left over on a 24 GB card spent on speed: checkpoint only every n-th layer (same call: n=1 too)
      for n in 1 2 4; do
        stage "keep24_n$n" 150 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --every-n $n \
          --label "24 GB bf16 LoRA (3090 cap), checkpoint 1 of $n layers" --gpu-gib 23.7 --data $DATA \
          --json "$OUT/d_keep24_n$n.json"
      done ;;
    keep20)  # the same on 20 GB (InternStudio's quarter A100): 4096 x 1, else 2048 x 2
      stage keep20_n2 150 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --every-n 2 \
        --label "20 GB bf16 LoRA (quarter A100 cap), checkpoint 1 of 2 layers" --gpu-gib 19.5 --data $DATA \
        --json "$OUT/d_keep20_n2.json"
      if ! grep -q '"headroom_ok": true' "$OUT/d_keep20_n2.json" 2>/dev/null; then
        stage keep20_n2_2048 150 env GLMLORA_ATTENTION=$SMALL $RUN train $X $STEPS --every-n 2 --pack 2048 --ga 2 \
          --label "20 GB bf16 LoRA (quarter A100 cap), 2048 x 2, checkpoint 1 of 2 layers" --gpu-gib 19.5 \
          --data $DATA --json "$OUT/d_keep20_n2_2048.json"
      fi ;;
    lora_cold) rm -rf /tmp/issue13-chat-lora   # lesson 06's case: chat through an unmerged LoRA adapter
      stage lora_cold 200 env GLMLORA_WORKDIR=/tmp/issue13-chat-lora $RUN chat $X --lora \
        --label "first reply through LoRA, cold (new cache)" --json "$OUT/e_lora_cold.json" ;;
    lora_warm) stage lora_warm 120 env GLMLORA_WORKDIR=/tmp/issue13-chat-lora $RUN chat $X --lora \
        --label "first reply through LoRA, warm (cache kept)" --json "$OUT/e_lora_warm.json" ;;
    old_cold|old_warm)  # the same stage with glmlora before decode_step (.gpu/old/glmlora: git archive 808a086 glmlora)
      [ "$1" = old_cold ] && rm -rf /tmp/issue13-chat-old
      stage "$1" 200 env GLMLORA_WORKDIR=/tmp/issue13-chat-old GLMLORA_PATH="$PWD/.gpu/old" $RUN chat $X \
        --label "first reply, ${1#old_}, whole-model compile (glmlora 808a086)" --json "$OUT/e_$1.json" ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}

for name in $STAGE_LIST; do one "$name"; done
echo; echo "=== $CALL done after $(( $(date +%s) - T0 )) s"
$PY benchmarks/issue13.py table "$OUT"/*.json
sleep 1  # let tee write the last lines
