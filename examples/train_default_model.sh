#!/usr/bin/env bash
# Reproduce the bundled default model (fundus-lite0+lite1-mirror 0.3.0) from the EyePACS photos:
# two networks trained whole at 256 px (EfficientNet-Lite0: run B, then run C from it;
# EfficientNet-Lite1: run F), each exported with float16 weights, combined 0.6 : 0.4, measured
# through the runtime (gallery = training split, queries = test split, k = 10), the measurement
# recorded in the file, then its input gate calibrated. docs/ABLATIONS.md gives each run's figures.
# About 3 h 45 min on a 2-core CPU (B 61 min, C 40 min, F 2 h); minutes on a GPU (TRAIN_ARGS="--device cuda").
#
# Usage: examples/train_default_model.sh [-h] [DATA] [OUT_DIR]
#
#   DATA     labels.csv with a split column (train/test) and images/ beside it, or its folder
#            (default ../shared/data/eyepacs256)
#   OUT_DIR  default runs/default: a folder per run, the member files, cases/ and default.onnx
#
# A finished run (its test_metrics.json written) is not trained again, an interrupted one
# continues from its last.pt: run the script again after an interruption.
# Environment: PYTHON (default python), FUNDUS_SDK (default fundus-sdk), VERSION (default 0.3.0),
# TRAIN_ARGS: flags added to every training run (e.g. "--device cuda").
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
    usage
    exit 0
fi

data=${1:-../shared/data/eyepacs256}
out=${2:-runs/default}
python=${PYTHON:-python}
fundus=${FUNDUS_SDK:-fundus-sdk}
version=${VERSION:-0.3.0}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[[ -d $data ]] && data=$data/labels.csv
[[ -f $data ]] || { echo "train_default_model.sh: $data: no label file" >&2; exit 2; }
images=$(dirname "$data")/images

# 1. Train. Both families share the grade-led recipe: fine triplet loss x0.1, cross-entropy x1,
#    ordinal term x1, every layer trained, batch 32, 256 px.
recipe=(--data "$data" --frozen-blocks 0 --input-size 256 --batch-size 32 --metric-weight 0.1 --aux-weight 1.0 --ordinal-weight 1.0)
train() {
    local run=$out/$1
    shift
    [[ -f $run/test_metrics.json ]] && return
    local resume=()
    [[ -f $run/last.pt ]] && resume=(--resume)
    "$python" -m training train "${recipe[@]}" --out "$run" "$@" "${resume[@]}" "${train_args[@]}"
}
train lite0-b --epochs 7
train lite0-c --epochs 5 --lr 3e-4 --backbone-lr 1e-4 --init "$out/lite0-b/last.pt"
train lite1-f --backbone tf_efficientnet_lite1 --epochs 12

# 2. Export each member (validation chose the epoch in best.pt) and combine them.
for run in lite0-c lite1-f; do
    "$python" -m export "$out/$run/best.pt" -o "$out/$run.onnx" --fp16-weights --name "fundus-${run%-*}-mirror" \
        --version "$version" --verify-images "$images" > "$out/$run.export.txt"
done
combine() {
    "$python" -m export.ensemble "$out/lite0-c.onnx" "$out/lite1-f.onnx" --weights 0.6 0.4 --name fundus-lite0+lite1-mirror \
        --version "$version" --verify-images "$images" "$@"
}
combine -o "$out/measured.onnx"

# 3. Measure the file as users run it: the training split indexed, the test split as queries.
"$python" - "$data" "$out/split" <<'EOF'
import csv, os, sys
from pathlib import Path
source, split = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
split.mkdir(parents=True, exist_ok=True)
if not (split / "images").exists():
    os.symlink(source.parent / "images", split / "images")
with source.open(newline="") as f:
    rows = list(csv.DictReader(f))
for name in ("train", "test"):
    chosen = [r for r in rows if r["split"] == name]
    with (split / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    (split / f"{name}.txt").write_text("".join(f"{split / 'images' / r['image']}\n" for r in chosen))
EOF
rm -rf "$out/cases"
"$fundus" index create "$out/cases" --model "$out/measured.onnx"
mapfile -t gallery < "$out/split/train.txt"
"$fundus" index add "$out/cases" "${gallery[@]}" --labels "$out/split/train.csv" --no-check --quiet --model "$out/measured.onnx"
"$fundus" evaluate --index "$out/cases" --queries "$out/split/test.csv" --model "$out/measured.onnx" --json --quiet > "$out/metrics.json"

# 4. The same file with its measurement recorded (same weights, same fingerprint), then its input gate.
combine -o "$out/default.onnx" --metrics "$out/metrics.json"
"$python" -m export.gate "$out/default.onnx" --data "$data"
"$fundus" info --model "$out/default.onnx"
echo "to bundle it: cp $out/default.onnx $repo/fundus_sdk/models/default.onnx"
