#!/usr/bin/env bash
# GPU speed where multilingual-e5-small's weights cannot travel (benchmarks/gpu_speed.py says why): the
# training step of every adapter (adapter_speed.py --real --base-config) and scoring against
# CrossEncoder.predict (gpu_speed.py), both on e5-small's architecture with seeded random weights.
# benchmarks/gpu.sh is the full run (real weights: quality and parity too) where they can be copied.
#
#   benchmarks/gpu_speed.sh ARCH_DIR XQUAD_DIR OUT_DIR
#
# ARCH_DIR: e5-small's config.json and tokenizer files (~17 MB); XQUAD_DIR: xquad.de.json, xquad.en.json
# (the smoke check takes either).
# Uses $PYTHON (default python3); a missing module is installed only from $WHEELHOUSE (no index, into a
# temporary folder). Without a CUDA GPU it stops with exit code 3; GPU_SPEED_SMOKE=1 runs tiny settings on
# the CPU instead, to check the script.
set -euo pipefail
ARCH=${1:?usage: benchmarks/gpu_speed.sh ARCH_DIR XQUAD_DIR OUT_DIR}
XQUAD=${2:?usage: benchmarks/gpu_speed.sh ARCH_DIR XQUAD_DIR OUT_DIR}
OUT=${3:?usage: benchmarks/gpu_speed.sh ARCH_DIR XQUAD_DIR OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
SMOKE=${GPU_SPEED_SMOKE:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [[ "$SMOKE" != 1 ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_speed.sh: no CUDA GPU is visible; GPU_SPEED_SMOKE=1 checks the script on the CPU')" || exit 3
fi
missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in 'transformers peft pandas pyarrow mlflow pandera sentence_transformers'.split() if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
  [[ -d "${WHEELHOUSE:-}" ]] || { echo "gpu_speed.sh: missing $missing; set WHEELHOUSE=DIR of wheels (nothing is downloaded)" >&2; exit 4; }
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELHOUSE"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$SMOKE" == 1 ]]; then
  "$PYTHON" "$ROOT/benchmarks/adapter_speed.py" --quick --real --device cpu --out "$OUT/adapter_speed_gpu_16.json"
  # the smoke check reads whichever of the two languages XQUAD_DIR holds (CI: the en excerpt in benchmarks/fixtures)
  markets=$(for m in de en; do [[ -f "$XQUAD/xquad.$m.json" ]] && echo -n "$m,"; done)
  "$PYTHON" "$ROOT/benchmarks/gpu_speed.py" --quick --device cpu --arch "$ARCH" --xquad "$XQUAD" \
    --markets "${markets%,}" --out "$OUT/gpu_speed.json"
  exit 0
fi
"$PYTHON" -c "import torch; print('gpu_speed.sh:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
# The training workload as it runs (16 x 128, bf16 autocast), then a batch that fills the GPU.
for batch in 16,128 128,128; do
  "$PYTHON" "$ROOT/benchmarks/adapter_speed.py" --real --base-config "$ARCH" --device cuda --precision bf16 \
    --batch "$batch" --steps 30 --warmup 5 --out "$OUT/adapter_speed_gpu_${batch%%,*}.json"
done
"$PYTHON" "$ROOT/benchmarks/gpu_speed.py" --device cuda --arch "$ARCH" --xquad "$XQUAD" --out "$OUT/gpu_speed.json"
