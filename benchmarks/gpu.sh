#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md as two commands of at most about 5 minutes each, for a
# GPU machine without network (one H100/H200, 16 cores):
#
#   bash benchmarks/gpu.sh step [--tiny] [RESULTS]     the train step (eager, compiled), extraction and
#                                                      k-means in memory, the gpu tests, one torchrun training
#   bash benchmarks/gpu.sh trainer [--tiny] [RESULTS]  the loader alone, and the trainer end to end: CLIP,
#                                                      open_clip_train, ProtoCLIP faithful and single-pass
#   bash benchmarks/gpu.sh wheels                      (with network) the packages the GPU image lacks, as
#                                                      Python 3.12 wheels, into .whl/
#
# --tiny runs the same steps at toy sizes (on the CPU when there is no GPU): a rehearsal. RESULTS
# (default $OUT, else benchmarks/results/gpu) receives two files: COMMAND.json (the summary, with every
# benchmark's record) and COMMAND.log (every step's output). The work folder is under /tmp and goes
# at the end. Wheels in .whl/ (or $WHEELS) are installed into it first. A preflight imports every package the
# steps need. Each step runs under `timeout -k` inside the command's time budget (BUDGET seconds);
# a step whose input failed is skipped, and the summary table is printed on exit whatever ended the
# command.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PACKAGES=(open_clip_torch==3.3.0 webdataset==0.2.111 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4 tomli_w==1.2.0
          faiss-cpu==1.15.1)  # what the GPU image lacks (benchmarks/README.md)
usage() { echo "usage: bash benchmarks/gpu.sh step|trainer [--tiny] [RESULTS_FOLDER], or: bash benchmarks/gpu.sh wheels" >&2; exit 2; }

COMMAND=${1:-}
[ $# -gt 0 ] && shift
TINY=0 RESULTS=${OUT:-benchmarks/results/gpu}
for arg in "$@"; do
  case $arg in --tiny) TINY=1 ;; -*) usage ;; *) RESULTS=$arg ;; esac
done
case $COMMAND in
  wheels)
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}" ;;
  step | trainer) ;;
  *) usage ;;
esac

mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/protoclip-gpu-$COMMAND.XXXXXX") || exit 1
LOG=$RESULTS/$COMMAND.log
: > "$LOG"
: > "$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$TINY" = 1 ]; then
  BUDGET=${BUDGET:-1200} SLOWER=3  # a rehearsal on a CPU shared with other work: each step's limit x 3
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
  ARCH=protoclip-tiny BATCH=16 STEPS=2 WARMUP=1
  KM=(--n 2000 --k 50 --batch 64 --extract-batches 3 --warmup-batches 1 --restarts 1 --teacher-dim 64)
  E2E=(--samples 128 --image-size 64 --batch 32 --extract-batch 64 --workers 1 --episodes 2 --step-steps 2 --processes 1)
  LOADER=(--image-size 64 --workers 1 --batch 32 --batches 2 --device-batches 1)
else
  [ "$COMMAND" = step ] && BUDGET=${BUDGET:-240} || BUDGET=${BUDGET:-300}
  DEVICE=cuda ARCH=RN50 BATCH=256 STEPS=20 WARMUP=5 SLOWER=1
  KM=(--backends torch --batch 1024)
  # 12 shards of 1024 for 12 workers: open_clip_train reads the same samples (e2e.py).
  E2E=(--samples 12288 --image-size 256 --batch 256 --extract-batch 1024 --workers 12 --step-steps 10 --processes 16)
  LOADER=(--image-size 224 --workers 12 --batch 256 --batches 12 --device-batches 5)
fi
DEADLINE=$((SECONDS + BUDGET))
RESERVE=15  # seconds kept for the summary
declare -A STATUS
CURRENT= STARTED=0 PID= FAILED=0

record() {  # record NAME STATUS SECONDS
  STATUS[$1]=$2
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/steps.tsv"
  case $2 in ok | "skipped: no CUDA"*) ;; *) FAILED=1 ;; esac
  echo "== $1: $2 ($3 s)"
}

keep_log() {  # the step's output into the command's log (the last 2 MB of it)
  { echo "===== $1: ${STATUS[$1]}"; tail -c 2000000 "$WORK/$1.log" 2>/dev/null; } >> "$LOG"
}

# step NAME LIMIT [--needs STEP]... [--cuda] -- COMMAND...: run COMMAND under timeout, record how it ended.
step() {
  local name=$1 limit=$(($2 * SLOWER)) needs=(preflight) cuda=0
  shift 2
  while [ "$1" != -- ]; do
    case $1 in --needs) needs+=("$2"); shift 2 ;; --cuda) cuda=1; shift ;; esac
  done
  shift
  [ "$name" = preflight ] && needs=()
  for need in "${needs[@]}"; do
    if [ "${STATUS[$need]:-}" != ok ]; then record "$name" "skipped: $need ${STATUS[$need]:-did not run}" 0; return; fi
  done
  if [ "$cuda" = 1 ] && [ "$DEVICE" != cuda ]; then record "$name" "skipped: no CUDA (rehearsal)" 0; return; fi
  local left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt 10 ]; then record "$name" "skipped: no time left in the budget of $BUDGET s" 0; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  CURRENT=$name STARTED=$SECONDS
  echo "== $name (at most $limit s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1 &
  PID=$!
  wait "$PID"  # in the background, so that a signal to this script runs its trap at once
  local code=$?
  CURRENT=
  tail -n 15 "$WORK/$name.log"
  case $code in
    0) record "$name" ok $((SECONDS - STARTED)) ;;
    124 | 137) record "$name" "timed out after $limit s" $((SECONDS - STARTED)) ;;
    *) record "$name" "failed (exit $code)" $((SECONDS - STARTED)) ;;
  esac
  keep_log "$name"
}

finish() {  # the exit status: the signal's (128 + n) if one ended the command, else 1 if a step did not succeed
  local code=$?
  trap - EXIT INT TERM
  trap '' PIPE  # whoever reads the output may be gone: the results and the clean-up still happen
  if [ -n "$CURRENT" ]; then
    kill "$PID" 2> /dev/null && wait "$PID"
    record "$CURRENT" "stopped: the command was ended" $((SECONDS - STARTED))
    keep_log "$CURRENT"
  fi
  echo
  echo "===== $COMMAND: summary"
  "$PY" benchmarks/gpu_summary.py "$WORK" --command "$COMMAND" --seconds "$SECONDS" --write "$RESULTS/$COMMAND.json" \
    2>&1 | tee -a "$LOG"
  rm -rf "$WORK"
  [ "$code" = 0 ] && code=$FAILED
  exit "$code"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Python packages the image lacks travel as wheels (benchmarks/README.md), in $WHEELS (default .whl; empty: none).
WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $WORK/site"
  { echo "===== wheels"; "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WHEELS"/*.whl 2>&1; } | tee -a "$LOG"
fi

# Every package the steps import, with its version; one line naming what is missing.
cat > "$WORK/preflight.py" <<'EOF'
import importlib, importlib.metadata, platform, sys

needed = {  # distribution: the modules the steps import
    "torch": ["torch", "torch.distributed.run"], "torchvision": ["torchvision"], "numpy": ["numpy"], "pillow": ["PIL"],
    "open_clip_torch": ["open_clip", "open_clip_train.main"], "webdataset": ["webdataset"], "braceexpand": ["braceexpand"],
    "ftfy": ["ftfy"], "wcwidth": ["wcwidth"], "regex": ["regex"], "timm": ["timm"], "tomli_w": ["tomli_w"],
    "faiss-cpu": ["faiss"], "h5py": ["h5py"], "scikit-learn": ["sklearn"], "rich": ["rich"], "typer": ["typer"],
    "pyyaml": ["yaml"], "pytest": ["pytest"],
}
missing = []
for dist, modules in needed.items():
    try:
        for module in modules:
            importlib.import_module(module)
        print(dist, importlib.metadata.version(dist))
    except Exception as error:  # whatever fails, the package is unusable here
        missing.append(f"{dist} ({type(error).__name__}: {error})")
if missing:
    sys.exit("preflight: missing or broken: " + "; ".join(missing) + " (carry wheels in .whl/: benchmarks/README.md).")
try:
    for module in ("protoclip_cli.cli", "protoclip_cli.training.loop", "protoclip_cli.training.open_clip_peer"):
        importlib.import_module(module)
except Exception as error:
    sys.exit(f"preflight: this project does not import: {type(error).__name__}: {error}")
import torch

print("python", platform.python_version(), "| CUDA device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("preflight: no CUDA device here; this command measures a GPU (--tiny rehearses on the CPU).")
EOF

step preflight 120 -- "$PY" "$WORK/preflight.py" "$DEVICE"
if [ "$COMMAND" = step ]; then
  step train_step-eager 120 -- "$PY" benchmarks/train_step.py --device "$DEVICE" --arch "$ARCH" --batch "$BATCH" \
    --steps "$STEPS" --warmup-steps "$WARMUP" --json "$WORK/train_step-eager.json"
  step extract_kmeans 120 -- "$PY" benchmarks/extract_kmeans.py --device "$DEVICE" --arch "$ARCH" "${KM[@]}" \
    --json "$WORK/extract_kmeans.json"
  step gpu-tests 90 --cuda -- "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py tests/test_kmeans.py
  # The distributed start-up (torchrun, the process group) on this device: the tiny model on a small generated set,
  # a warm-up episode and a prototype episode (extraction and k-means through the process group).
  step torchrun-data 60 -- "$PY" benchmarks/e2e.py --samples 128 --image-size 64 --batch 32 --workers 1 --processes 1 \
    --workspace "$WORK/ws" --prepare-only
  step torchrun 90 --needs torchrun-data -- env NCCL_SOCKET_IFNAME=lo "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node 1 -m protoclip_cli train recipes/synthetic.toml --workspace "$WORK/ws" --no-resume \
    --set name=torchrun-check --set device="$DEVICE" --set data.dataset=e2e --set proto.teacher=bow \
    --set data.workers=1 --set data.batch_size=32 --set data.episode_size=128 --set schedule.episodes=2 \
    --set schedule.lit_start_episode=99 --set proto.k=8 --set proto.teacher_k=8
  step train_step-compiled 180 --cuda -- "$PY" benchmarks/train_step.py --device "$DEVICE" --arch "$ARCH" \
    --batch "$BATCH" --steps "$STEPS" --warmup-steps "$((WARMUP + 5))" --compile --variants openclip,protoclip \
    --json "$WORK/train_step-compiled.json"
else
  step e2e-data 120 -- "$PY" benchmarks/e2e.py "${E2E[@]}" --workspace "$WORK/ws" --prepare-only
  for augmentation in rrc light; do
    step "dataloader-$augmentation" 60 --needs e2e-data -- "$PY" benchmarks/dataloader.py --workspace "$WORK/ws" \
      --dataset e2e --augmentation "$augmentation" "${LOADER[@]}" --device "$DEVICE" --json "$WORK/dataloader-$augmentation.json"
  done
  step e2e 300 --needs e2e-data -- "$PY" benchmarks/e2e.py --device "$DEVICE" --arch "$ARCH" "${E2E[@]}" \
    --workspace "$WORK/ws" --json "$WORK/e2e.json"
  # The extraction pass's loader as the ProtoCLIP recipe reads it (training views of `light`): where the trainer's
  # extraction falls short of the in-memory rate, this says whether the loader is why.
  step dataloader-extract 60 --needs e2e-data -- "$PY" benchmarks/dataloader.py --workspace "$WORK/ws" --dataset e2e \
    --pass extract --augmentation light "${LOADER[@]}" --device "$DEVICE" --json "$WORK/dataloader-extract.json"
fi
exit 0
