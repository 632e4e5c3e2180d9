#!/usr/bin/env bash
# `richpref doctor` on the tiny profiles on a CUDA GPU, in float16 and bfloat16; one table per run.
#   bench/doctor_gpu.sh OUT_DIR [ITEMS]
# Builds the tiny models into a temporary folder first. Needs a CUDA build of torch (DEVICE=cpu to try
# the script elsewhere).
set -u
out=${1:?usage: bench/doctor_gpu.sh OUT_DIR [ITEMS]}
items=${2:-32}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
models=$(mktemp -d)/models
device=${DEVICE:-cuda}
log="$out/doctor.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$log" 2>&1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$log" 2>&1
$py -m richpref.cli.commands models build-tiny "$models" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
for run in ${RUNS:-tiny:float16 tiny:bfloat16 tiny-sdxl:float16}; do
  profile=${run%%:*} dtype=${run##*:}
  echo "== doctor $profile $dtype"
  $py -m richpref.cli.commands --data-dir "$(mktemp -d)" doctor --profile "$profile" --models-root "$models" --items "$items" \
    --project-items 100000 --device "$device" --dtype "$dtype" --json "$out/doctor-$profile-$dtype.json" \
    > "$out/doctor-$profile-$dtype.txt" 2> >(tee -a "$log" | grep -v -i "warn\|Loading\|Generating" | tail -5 >&2)
  echo "exit $?"; cat "$out/doctor-$profile-$dtype.txt"
done
