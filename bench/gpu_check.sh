#!/usr/bin/env bash
# The GPU check of issue 19: one prepared script, at most 10 minutes on one H100, one results file.
#
#   bench/gpu_check.sh --download-wheels [DIR]   # 1. on the CPU machine (it reaches the package index): the wheels
#                                                #    the GPU machine lacks (trl, peft, datasets and what they need)
#                                                #    into DIR (default .whl/, git-ignored, carried with the tree)
#   bench/gpu_check.sh [--wheels DIR] [--out FILE] [--only STEPS] [--minutes N]   # 2. on the GPU machine
#   bench/gpu_check.sh --dry-run ...             # print every step and command, check the inputs, run nothing
#
# The GPU machine reaches no package index and has its own torch, transformers and accelerate, but not trl, peft
# or datasets: step `install` installs them from the carried wheels (--no-index). vLLM is too large to carry: the
# vLLM side of the generation benchmark runs only where it is already installed; so do ZeRO-3 (deepspeed) and
# QLoRA (bitsandbytes), each skipped with a line saying why. Steps, in order (--only takes a comma list of them):
#   install     pip install the carried wheels, then print versions and the GPU
#   packing     bench/packing_check.py: padding-free against padded (DPO pairs, SFT rows) on the Qwen2.5-0.5B shape
#               in bf16: values, gradients, time, and which kernel ran (flash-attention varlen where installed)
#   throughput  bench/throughput.py sft, dpo, reward on the Qwen2.5-0.5B shape: ours vs TRL, MFU, peak memory
#   generation  bench/generation.py: align's batched sampling vs a naive loop (+ vLLM where installed)
#   fsdp2       a 2-step DPO run under accelerate launch with recipes/accelerate/fsdp2.yaml (1 process)
#   zero3       the same under recipes/accelerate/zero3.yaml (needs deepspeed)
#   qlora       a 2-step DPO run with load_in_4bit (needs bitsandbytes)
#   memory      `align memory` estimates for the throughput shapes, beside the peaks throughput measured
# Every step has its own time limit (their sum fits --minutes, default 10); a step that fails or times out is
# recorded as such and the next one runs. Results: one markdown file (--out, default $OUT/gpu_check.md when $OUT
# is set, else bench/results/gpu_check.md) with each step's command, status, seconds and output tail, and the
# benchmarks' own result files next to it.
set -u

STEPS_ALL="install packing throughput generation fsdp2 zero3 qlora memory"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
OUTFILE=""
ONLY="$STEPS_ALL"
MINUTES=10
DRY=0
DOWNLOAD=0
PYTHON="${PYTHON:-python}"
# What the GPU machine lacks. Pinned to what this checkout is tested with; their own dependencies that torch,
# transformers and accelerate do not already bring come too (pip download resolves them).
WHEEL_SPECS="trl==1.16.0 peft==0.21.2 datasets==5.2.0"

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --download-wheels)
            DOWNLOAD=1
            if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then WHEELS="$2"; shift; fi ;;
        --wheels) [ $# -gt 1 ] || die "--wheels needs a directory"; WHEELS="$2"; shift ;;
        --out) [ $# -gt 1 ] || die "--out needs a file"; OUTFILE="$2"; shift ;;
        --only) [ $# -gt 1 ] || die "--only needs a comma-separated list of steps"; ONLY="${2//,/ }"; shift ;;
        --minutes) [ $# -gt 1 ] || die "--minutes needs a number"; MINUTES="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
case "$MINUTES" in ''|*[!0-9]*) die "--minutes must be a whole number, got '$MINUTES'" ;; esac
[ "$MINUTES" -ge 1 ] || die "--minutes must be at least 1"
for step in $ONLY; do
    case " $STEPS_ALL " in *" $step "*) ;; *) die "unknown step '$step'; steps: ${STEPS_ALL// /,}" ;; esac
done

# ---- the companion step: wheels for the GPU machine ---------------------------------------------------------------
if [ "$DOWNLOAD" = 1 ]; then
    cmd=("$PYTHON" -m pip download --dest "$WHEELS" --only-binary=:all: $WHEEL_SPECS)
    echo "download: ${cmd[*]}"
    if [ "$DRY" = 1 ]; then
        echo "dry run: nothing downloaded"
        exit 0
    fi
    mkdir -p "$WHEELS"
    "${cmd[@]}" || die "pip download failed"
    # torch, transformers, accelerate and their stack are on the GPU machine already: do not carry them.
    find "$WHEELS" -maxdepth 1 \( -name 'torch-*' -o -name 'nvidia_*' -o -name 'triton-*' -o -name 'transformers-*' \
         -o -name 'accelerate-*' -o -name 'tokenizers-*' -o -name 'safetensors-*' -o -name 'huggingface_hub-*' \
         -o -name 'numpy-*' -o -name 'sympy-*' -o -name 'networkx-*' \) -delete
    size=$(du -sm "$WHEELS" | cut -f1)
    echo "wheels in $WHEELS: ${size} MiB (the working tree carries at most 64 MiB)"
    [ "$size" -le 60 ] || echo "warning: ${size} MiB of wheels leaves little room in the 64 MiB carried" >&2
    exit 0
fi

# ---- the check -----------------------------------------------------------------------------------------------------
if [ -z "$OUTFILE" ]; then
    if [ -n "${OUT:-}" ]; then OUTFILE="$OUT/gpu_check.md"; else OUTFILE="$ROOT/bench/results/gpu_check.md"; fi
fi
RESULTS="$(dirname "$OUTFILE")"
WORK="${TMPDIR:-/tmp}/gpu_check.$$"
TOTAL=$((MINUTES * 60))
# Seconds per step, in proportion to what each needs on an H100 (throughput: three methods x two trainers).
declare -A SHARE=([install]=4 [packing]=4 [throughput]=40 [generation]=16 [fsdp2]=9 [zero3]=9 [qlora]=9 [memory]=2)
declare -A LIMIT
for step in $STEPS_ALL; do LIMIT[$step]=$((TOTAL * ${SHARE[$step]} / 93)); done
LIMIT[throughput]=$((LIMIT[throughput] / 3))  # per method

have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

smoke_args() {  # a 2-step DPO run of the tests' tiny model on 8 generated pairs, with extra config keys
    echo "align dpo --model $WORK/tiny --train_file $WORK/pairs.jsonl --eval_file none --max_steps 2 \
--per_device_train_batch_size 4 --logging_steps 1 --save_steps 100 --report_to none --output_dir $WORK/run-$1 $2"
}

declare -a NAMES CMDS
add() { NAMES+=("$1"); CMDS+=("$2"); }
for step in $STEPS_ALL; do  # in this order, whatever the order of --only
    case " $ONLY " in *" $step "*) ;; *) continue ;; esac
    case "$step" in
        install)
            add install "$PYTHON -m pip install --no-index --find-links $WHEELS $WHEEL_SPECS && $PYTHON -c \
'import torch, transformers, accelerate, trl, peft, datasets; print(torch.cuda.get_device_name(0), \"torch\", \
torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__, \"accelerate\", \
accelerate.__version__, \"trl\", trl.__version__, \"peft\", peft.__version__)' && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv" ;;
        packing)
            add packing "$PYTHON bench/packing_check.py --shape qwen2.5-0.5b" ;;
        throughput)
            for method in sft dpo reward; do
                add "throughput-$method" "$PYTHON bench/throughput.py --method $method --shape qwen2.5-0.5b --warmup 2 \
--steps 5 --threads 4 --results_dir $RESULTS"
            done ;;
        generation)
            sides="naive,ours"
            have vllm && sides="$sides,ours+vllm"
            add generation "$PYTHON bench/generation.py --rounds 2 --sides $sides --results_dir $RESULTS" ;;
        fsdp2)
            add fsdp2 "accelerate launch --num_processes 1 --config_file recipes/accelerate/fsdp2.yaml -m \
$(smoke_args fsdp2 '')" ;;
        zero3)
            add zero3 "deepspeed:accelerate launch --num_processes 1 --config_file recipes/accelerate/zero3.yaml -m \
$(smoke_args zero3 '')" ;;
        qlora)
            add qlora "bitsandbytes:$PYTHON -m $(smoke_args qlora '--load_in_4bit true')" ;;
        memory)
            add memory "for m in sft dpo reward; do $PYTHON -m align memory --model qwen2.5-0.5b --method \$m --lora \
--batch 8 --max_length 1024 --gpu h100-80gb; done; $PYTHON -c 'import json, glob; [print(p, \"measured peak GiB:\", \
{k: json.load(open(p))[k].get(\"peak_memory_gib\") for k in (\"ours\", \"trl\")}) for p in \
sorted(glob.glob(\"$RESULTS/throughput_*qwen2.5-0.5b*.json\"))]'" ;;
    esac
done

if [ "$DRY" = 1 ]; then
    echo "dry run: ${#NAMES[@]} commands, results to $OUTFILE, wheels from $WHEELS, ${MINUTES} min in all"
    [ -d "$WHEELS" ] || echo "note: $WHEELS does not exist here; run --download-wheels on the CPU machine first"
    for f in bench/packing_check.py bench/throughput.py bench/generation.py recipes/accelerate/fsdp2.yaml recipes/accelerate/zero3.yaml; do
        [ -f "$ROOT/$f" ] || die "missing $f"
    done
    for i in "${!NAMES[@]}"; do
        step="${NAMES[$i]%%-*}"; cmd="${CMDS[$i]}"; need=""
        case "$cmd" in deepspeed:*|bitsandbytes:*) need=" (needs ${cmd%%:*})"; cmd="${cmd#*:}" ;; esac
        echo "[${NAMES[$i]}] limit ${LIMIT[$step]} s${need}: $cmd"
    done
    exit 0
fi

cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
mkdir -p "$RESULTS" "$WORK"
"$PYTHON" - "$WORK" <<'PY' || echo "could not prepare the smoke-run model and data" >&2
import json, random, sys
from pathlib import Path
from align.models import save_tiny_model
work = Path(sys.argv[1])
save_tiny_model(work / "tiny")
rng = random.Random(0)
words = "alpha beta gamma delta answer question number because".split()
text = lambda n: " ".join(rng.choice(words) for _ in range(n))
with open(work / "pairs.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"prompt": f"question {i}: " + text(5), "chosen": text(8), "rejected": text(6)}) + "\n")
PY
{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "\`bench/gpu_check.sh\`, steps: ${ONLY}; ${MINUTES} min budget."
    echo
} > "$OUTFILE"
START=$SECONDS
for i in "${!NAMES[@]}"; do
    name="${NAMES[$i]}"; cmd="${CMDS[$i]}"; step="${name%%-*}"
    need=""
    case "$cmd" in deepspeed:*|bitsandbytes:*) need="${cmd%%:*}"; cmd="${cmd#*:}" ;; esac
    limit=${LIMIT[$step]}
    left=$((TOTAL - (SECONDS - START)))
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s)"
    if [ -n "$need" ] && ! have "$need"; then
        status="skipped: $need is not installed here"; seconds=0; tail_out=""
    elif [ "$limit" -le 5 ]; then
        status="skipped: out of time"; seconds=0; tail_out=""
    else
        t0=$SECONDS
        timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1
        rc=$?
        seconds=$((SECONDS - t0))
        case $rc in 0) status="ok" ;; 124|137) status="timed out after ${limit} s" ;; *) status="failed (exit $rc)" ;; esac
        tail_out="$(tail -n 25 "$WORK/$name.log")"
    fi
    echo "   $status (${seconds} s)"
    {
        echo "## $name: $status (${seconds} s)"
        echo
        echo "\`$cmd\`"
        echo
        if [ -n "$tail_out" ]; then echo '```'; echo "$tail_out"; echo '```'; echo; fi
    } >> "$OUTFILE"
done
have vllm || echo "vLLM is not installed on this machine: no vLLM side in the generation benchmark." >> "$OUTFILE"
echo "results: $OUTFILE"
