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
# The raw figures on the harness's format: bench/results/doctor_gpu-<commit>.json (one trial per profile and dtype).
PYTHONPATH="$(dirname "$0")" $py - "$out" "$items" <<'PY'
import json, sys
from pathlib import Path

import harness

out, items = Path(sys.argv[1]), sys.argv[2]
runs = []
for f in sorted(out.glob("doctor-*.json")):
    rep = json.loads(f.read_text())["report"]
    side = f.stem[len("doctor-"):]
    runs.append({"side": side, "repeat": 0, "hours_per_worker": rep["total"]["hours_per_worker"],
                 **{f"{s['stage']}.items_per_s": s["items_per_s"] for s in rep.get("stages", [])}})
if runs:
    b = harness.Bench("doctor_gpu", 1, command=" ".join(["bench/doctor_gpu.sh", str(out), items]))
    s = harness.summarize(runs)
    key = next((k for k in s if k.endswith(".hours_per_worker")), "hours_per_worker")
    b.write(harness.headline(key, s[key]["median"], "h per 100k items", None,
                             note=f"`richpref doctor --project-items 100000` on one GPU, {items} items measured per "
                                  "stage, tiny profiles; one trial per profile and dtype"), runs=runs)
    b.cleanup()
PY
