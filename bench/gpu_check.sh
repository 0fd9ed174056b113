#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, in under 8 minutes, the GPU-marked tests (`pytest -m gpu`: bf16
# autocast training with and without activation checkpointing, batched multi-adapter serving on CUDA), then the
# step-speed and activation-checkpointing benchmarks on `--device cuda` and a short serving benchmark (which has no
# device option: it serves on the CPU). Each stage runs under its own time limit, so one that hangs cannot take the
# others' time. A short report goes to report.md in the output folder, each stage's full output beside it.
#
#   bench/gpu_check.sh [OUTPUT_DIR]     # default: $OUT if set, else ./gpu-check-<UTC time>
#
# Without a visible CUDA device it says so, writes that to the report and exits 0 having run nothing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/report.md"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT" || exit 1

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- python: $PY"
} > "$REPORT"

gpu_line="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
cuda="$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)"
if [ -z "$gpu_line" ] || [ "$cuda" != "True" ]; then
  message="no GPU: no NVIDIA CUDA device is visible (nvidia-smi: ${gpu_line:-none}; torch.cuda.is_available(): ${cuda:-torch not importable}); nothing was run"
  echo "- $message" >> "$REPORT"
  echo "$message"
  echo "report: $REPORT"
  exit 0
fi
echo "- GPU: $gpu_line; torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')" >> "$REPORT"
echo >> "$REPORT"
echo "| stage | limit (s) | took (s) | exit |" >> "$REPORT"
echo "|---|---|---|---|" >> "$REPORT"

failed=0
stage() {  # stage NAME LIMIT_SECONDS COMMAND...: runs it, logs to NAME.log, adds a row to the report
  local name="$1" limit="$2"
  shift 2
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || failed=1
  local status=$rc
  [ $rc -eq 124 ] && status="124 (time limit)"
  echo "| $name | $limit | $((SECONDS - start)) | $status |" >> "$REPORT"
  tail -n 3 "$OUTDIR/$name.log"
}

# 7.5 minutes in all, at most: tests 150 s, step speed 90 s, activation checkpointing 60 s, serving 150 s.
stage gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests
stage step-speed 90 "$PY" bench/step_speed.py --device cuda --rounds 10
stage activation-checkpointing 60 "$PY" bench/activation_checkpointing.py --device cuda --steps 4 --rounds 5
stage serving 150 "$PY" bench/serving.py --models smollm2 --seconds 10 --warmup 3 --rounds 1 --step-rounds 10

for name in gpu-tests step-speed activation-checkpointing serving; do
  {
    echo
    echo "## $name"
    echo
    echo '```'
    grep -v -e "Loading weights" -e "warnings.warn" "$OUTDIR/$name.log" | tail -n 40
    echo '```'
  } >> "$REPORT"
done
echo "report: $REPORT"
exit $failed
