#!/usr/bin/env bash
# The production run of the adaptation recipe on a bare CUDA machine, one step per device call.
# See docs/gpu-run.md for the sequence, what each call carries and what comes back.
#
#   bash dlm/adapt/gpu_steps.sh call1     # carry runs/gpu-upload/upload1: base part 1 + gguf; CUDA smoke test
#   bash dlm/adapt/gpu_steps.sh call2     # carry runs/gpu-upload/upload2: base part 2; data + training
#   bash dlm/adapt/gpu_steps.sh call3     # training to the end, eval, export; returns parts 0-3
#
# Environment knobs (the defaults are the plan): DATA_BUDGET_S (220), TRAIN_BUDGET_S (240 in
# call2, 360 in call3), EPOCHS (the preset's 1.0; must be the same in call2 and call3, since
# the learning-rate schedule's length depends on it). For a dry run on CPU of the whole
# sequence: DEVICE=cpu SCALE=tiny PYTHON=.venv/bin/python OUT=runs/dry-out BENCH_ARGS="--batch-size 1
# --seq-len 32 --train-steps 1 --gen-batch-size 1 --new-tokens 2".
#   bash dlm/adapt/gpu_steps.sh return 4  # returns parts 4-7 (then: return 8 for part 8 on)
#
# Everything lives in runs/gpu-work on the machine's disk (ignored, so kept between calls while
# the machine stays warm). Every step is resumable: rerunning a call continues where it stopped.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=runs/gpu-work
BASE=$W/base/SmolLM2-135M-Instruct.Q4_1.gguf
RUN=$W/run
OUT=${OUT:-$W/out}
mkdir -p "$W/base" "$OUT"
export PYTHONPATH="$PWD/$W/base/site${PYTHONPATH:+:$PYTHONPATH}"  # the carried gguf package
export VOICE_AGENT_CACHE_DIR="$PWD/$W/cache"  # the GGUF's float32 conversion, made once
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ADAPT=("$PY" -m dlm.adapt)
DEVICE=${DEVICE:-cuda}
FULL=(--scale "${SCALE:-full}" --device "$DEVICE" --base "$BASE" --out "$RUN")

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

case "${1:-}" in
call1)
    cp -r runs/gpu-upload/upload1/. "$W/base/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/steps.log"
    "$PY" -c "import torch, transformers, gguf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'gguf', gguf.__version__)" | tee -a "$OUT/steps.log"
    log "tiny recipe on cuda (smoke test of the CUDA path)"
    "$PY" -c "import sys; sys.path.insert(0, 'tests/dlm'); from pathlib import Path; \
from adapt_fixtures import tiny_ar_checkpoint; tiny_ar_checkpoint(Path('$W/tiny-base'))"
    rm -rf "$W/tiny-run"
    "${ADAPT[@]}" pipeline --scale tiny --device "$DEVICE" --base "$W/tiny-base" --out "$W/tiny-run" 2>&1 | tail -25 | tee -a "$OUT/steps.log"
    cp "$W/tiny-run/summary.json" "$OUT/tiny-summary.json"
    log "bench: training and teacher-decoding step times on a random SmolLM2-135M-shaped model"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options on purpose
    "${ADAPT[@]}" bench --device "$DEVICE" --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tail -3 | tee -a "$OUT/steps.log"
    log "call1 done"
    ;;
call2)
    cp -r runs/gpu-upload/upload2/. "$W/base/"
    "${ADAPT[@]}" join "$BASE.manifest.json" --out "$BASE" || exit 1
    log "data (teacher generation), budget ${DATA_BUDGET_S:-220} s"
    "${ADAPT[@]}" data "${FULL[@]}" --time-budget-s "${DATA_BUDGET_S:-220}" 2>&1 | tail -5 | tee -a "$OUT/steps.log"
    log "training, budget ${TRAIN_BUDGET_S:-240} s (resumable)"
    "${ADAPT[@]}" train "${FULL[@]}" ${EPOCHS:+--epochs "$EPOCHS"} --time-budget-s "${TRAIN_BUDGET_S:-240}" 2>&1 | tail -5 | tee -a "$OUT/steps.log"
    cp "$RUN/summary.json" "$OUT/"
    log "call2 done"
    ;;
call3)
    log "training to the end (budget 360 s), eval, export"
    "${ADAPT[@]}" pipeline "${FULL[@]}" ${EPOCHS:+--epochs "$EPOCHS"} --train-budget-s "${TRAIN_BUDGET_S:-360}" --eval-prompts 256 2>&1 | tail -40 | tee -a "$OUT/steps.log"
    if [ -f "$RUN/smollm2-135m-bd.safetensors" ]; then
        rm -rf "$W/ret"
        "${ADAPT[@]}" split "$RUN/smollm2-135m-bd.safetensors" --out "$W/ret"
        cp "$W"/ret/*.manifest.json "$W"/ret/*.part0[0-3] "$OUT/"
    fi
    # The held-out examples travel back too, so the student can be re-checked on CPU.
    "$PY" -c "f = open('$RUN/data.jsonl'); o = open('$RUN/heldout.jsonl', 'w'); o.write(f.readline()); \
[o.write(line) for line in f if '\"split\":\"heldout\"' in line]"
    # At most 8 files come back: manifest + 4 parts + reports.tgz + steps.log.
    tar czf "$OUT/reports.tgz" -C "$RUN" summary.json eval.md eval.json heldout.jsonl
    log "call3 done"
    ;;
return)
    first=${2:?which part to start from}
    for k in 0 1 2 3; do
        part=$(printf "%s/ret/smollm2-135m-bd.safetensors.part%02d" "$W" $((first + k)))
        [ -f "$part" ] && cp "$part" "$OUT/"
    done
    ls -la "$OUT"
    ;;
*)
    echo "usage: $0 call1|call2|call3|return N" >&2
    exit 2
    ;;
esac
