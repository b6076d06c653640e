#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one run, for a GPU machine without network.
#
#   bash benchmarks/gpu.sh            # on a GPU machine: RN50 at 224 px, reference scale (under 8 minutes on an H200)
#   bash benchmarks/gpu.sh --tiny     # the same steps at toy sizes (on the CPU when there is no GPU): a rehearsal
#
# Python packages missing on the machine travel as wheels in .whl/ (benchmarks/README.md lists
# them); they are installed into a private folder first. Each step writes its JSON and its log into
# $OUT (default benchmarks/results/gpu); a failing step is recorded and the next one runs. The last
# step prints one table of the performance aims against the measured ratios (gpu_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/protoclip-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/protoclip-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$TINY" = 1 ]; then
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  ARCH=protoclip-tiny; BATCH=32; STEPS=2; WARMUP=1; K=64
  KM=(--n 4000 --k 100 --batch 64 --extract-batches 3 --warmup-batches 1 --teacher-dim 64)
  E2E=(--samples 512 --image-size 64 --batch 32 --extract-batch 64 --workers 1 --episodes 2 --step-steps 2 --processes 2)
  LOADER=(--image-size 64 --workers 1 --batch 32 --batches 6)
  TIMEOUT=300
else
  DEVICE=cuda; ARCH=RN50; BATCH=256; STEPS=20; WARMUP=5; K=20000
  KM=(--backends torch --batch 1024)
  E2E=(--samples 16384 --image-size 256 --batch 256 --extract-batch 1024 --workers 12)
  LOADER=(--image-size 224 --workers 12 --batch 256 --batches 40)
  TIMEOUT=240
fi
E2E_WS=$OUT_DIR/e2e-workspace

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT_DIR/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$([ $status = 0 ] && echo ok || echo "failed ($status)")" "$((SECONDS - start))" >> "$OUT_DIR/steps.tsv"
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

step train_step-eager "$TIMEOUT" "$PY" benchmarks/train_step.py --device "$DEVICE" --arch "$ARCH" --batch "$BATCH" \
  --steps "$STEPS" --warmup-steps "$WARMUP" --k "$K" --json "$OUT_DIR/train_step-eager.json"
if [ "$DEVICE" = cuda ]; then  # the trainer compiles on CUDA only
  step train_step-compiled "$TIMEOUT" "$PY" benchmarks/train_step.py --device "$DEVICE" --arch "$ARCH" --batch "$BATCH" \
    --steps "$STEPS" --warmup-steps "$((WARMUP + 5))" --k "$K" --compile --variants openclip,protoclip \
    --json "$OUT_DIR/train_step-compiled.json"
fi
step extract_kmeans "$TIMEOUT" "$PY" benchmarks/extract_kmeans.py --device "$DEVICE" --arch "$ARCH" "${KM[@]}" \
  --json "$OUT_DIR/extract_kmeans.json"
step e2e-data "$TIMEOUT" "$PY" benchmarks/e2e.py "${E2E[@]}" --workspace "$E2E_WS" --prepare-only
for augmentation in rrc light; do
  step "dataloader-$augmentation" "$TIMEOUT" "$PY" benchmarks/dataloader.py --workspace "$E2E_WS" --dataset e2e \
    --augmentation "$augmentation" "${LOADER[@]}" --device "$DEVICE" --json "$OUT_DIR/dataloader-$augmentation.json"
done
step dataloader-extract "$TIMEOUT" "$PY" benchmarks/dataloader.py --workspace "$E2E_WS" --dataset e2e --pass extract \
  "${LOADER[@]}" --device "$DEVICE" --json "$OUT_DIR/dataloader-extract.json"
step e2e "$((TIMEOUT * 2))" "$PY" benchmarks/e2e.py --device "$DEVICE" --arch "$ARCH" "${E2E[@]}" --workspace "$E2E_WS" \
  --json "$OUT_DIR/e2e.json"
if [ "$DEVICE" = cuda ]; then
  step gpu-tests "$TIMEOUT" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
fi
# The distributed start-up (torchrun, the process group) on this device, with the tiny model on the e2e data.
step torchrun "$TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m protoclip_cli train \
  recipes/synthetic.toml --workspace "$E2E_WS" --no-resume --set name=torchrun-check --set device="$DEVICE" \
  --set data.dataset=e2e --set proto.teacher=bow --set data.workers=2 --set schedule.episodes=2 \
  --set data.episode_size=512 --set proto.k=16 --set proto.teacher_k=16

"$PY" benchmarks/gpu_summary.py "$OUT_DIR"
