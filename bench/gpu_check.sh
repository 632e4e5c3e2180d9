#!/usr/bin/env bash
# The device checks of a GPU machine in one script, every model on the GPU: `richpref doctor` (2 workers)
# on tiny-flux, a tiny-flux curate with --workers 2, a short Flow-DPO fine-tune on its pairs, then
# doctor on the other tiny profiles: PROFILES, entries PROFILE or PROFILE:DTYPE (default tiny tiny-sd3
# tiny-qwen-image; e.g. "tiny:float16 tiny:bfloat16 tiny-sdxl:float16" for dtypes side by side).
#   bench/gpu_check.sh OUT_DIR [ITEMS]
# OUT_DIR gets gpu_check.log (everything, with each step's wall), doctor-<profile>[-<dtype>].json and the
# fine-tune's metrics.jsonl and train.log; then `python bench/gpu_check_record.py OUT_DIR --commit SHA`
# here writes bench/results/gpu_check-<sha>.json. DEVICE=cpu DTYPE=float32: the same without a GPU.
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR [ITEMS]}
items=${2:-16}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
work=$(mktemp -d)
models=$work/models
log="$out/gpu_check.log"
rp=("$py" -m richpref.cli.commands)
step() {  # step NAME CMD...: runs CMD, logs its output and wall seconds
  local name=$1; shift
  local t0=$EPOCHREALTIME
  echo "== $name: $*" >> "$log"
  timeout "${STEP_TIMEOUT:-300}" "$@" >> "$log" 2>&1
  local rc=$?
  awk -v n="$name" -v rc=$rc -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "== %s: rc=%d wall=%.1fs\n", n, rc, b - a}' \
    | tee -a "$log"
  return $rc
}
doctor() {  # doctor PROFILE[:DTYPE]
  local profile=${1%%:*} d=$dtype tag=$1
  [ "$1" != "$profile" ] && d=${1##*:} tag="$profile-$d"
  step "doctor $tag" "${rp[@]}" --data-dir "$work/doctor-$tag" doctor --profile "$profile" --models-root "$models" \
    --items "$items" --workers 2 --project-items 100000 --device "$device" --dtype "$d" --json "$out/doctor-$tag.json"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $py -c "import torch, transformers, diffusers, prefect; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'transformers', transformers.__version__, 'diffusers', diffusers.__version__,
'prefect', prefect.__version__)"
  git rev-parse --short HEAD 2>/dev/null; nproc; } > "$log" 2>&1
cat "$log"
step build-tiny "${rp[@]}" models build-tiny "$models" || { tail -40 "$log"; exit 1; }
doctor tiny-flux
step "curate tiny-flux --workers 2" "${rp[@]}" --data-dir "$work/data" curate --profile tiny-flux --models-root "$models" \
  --run gpu --workers 2 || tail -60 "$log"
# The fine-tune needs pairs: should the Dask run fail (its log says why), curate in-process instead.
[ -d "$work/data/runs/gpu/pairs" ] || step "curate tiny-flux --workers 1" "${rp[@]}" --data-dir "$work/data" curate \
  --profile tiny-flux --models-root "$models" --run gpu || tail -60 "$log"
step "finetune finetune-tiny-flux" "${rp[@]}" --data-dir "$work/data" finetune --config finetune-tiny-flux \
  --models-root "$models" --pairs "$work/data/runs/gpu/pairs" --output-dir "$work/ft" || tail -60 "$log"
for run in ${PROFILES:-tiny tiny-sd3 tiny-qwen-image}; do
  doctor "$run"
done
# One line per doctor run: hours per worker and each stage's device and items/s.
for f in "$out"/doctor-*.json; do
  [ -f "$f" ] && $py -c "import json,sys; r=json.load(open(sys.argv[1]))['report']; print(sys.argv[1].split('/')[-1],
  'hours/worker', round(r['total']['hours_per_worker'], 3), {s['stage']: (s.get('device'), round(s['items_per_s'], 1))
  for s in r['stages']})" "$f"
done
cp "$work"/ft/metrics.jsonl "$work"/ft/train.log "$out/" 2>/dev/null
grep -i "cuda\|device\|mixed\|step_seconds" "$work"/ft/train.log 2>/dev/null | head -5
tail -n 3 "$out/metrics.jsonl" 2>/dev/null
