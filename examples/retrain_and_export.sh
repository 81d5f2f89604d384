#!/usr/bin/env bash
# Retrain the retrieval model on your own labelled photos, export it to one ONNX file, and use
# it with the `fundus-sdk` command. Run from a checkout with the training extras installed
# (pip install -e '.[train]'); the exported file needs only fundus-sdk itself.
#
# Usage: examples/retrain_and_export.sh [-h] DATA [OUT_DIR] [GALLERY_FOLDER]
#
#   DATA            a labels.csv (columns image, grade; optional patient, split), a folder
#                   holding labels.csv, or a folder of grade sub-folders 0/ .. 4/
#   OUT_DIR         run folder (default runs/mine): log.txt, best.pt, mine.onnx, cases/
#   GALLERY_FOLDER  optional photos to index and search with the new model
#
# Environment: PYTHON (default python), FUNDUS_SDK (default fundus-sdk), TRAIN_ARGS: more
# training flags (see `python -m training train --help`), e.g. a smoke run for CI:
#   TRAIN_ARGS="--limit 64 --epochs 1 --aug-views 0 --input-size 128" examples/retrain_and_export.sh DATA /tmp/mine
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
    usage
    exit 0
elif [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi

data=$1
out=${2:-runs/mine}
gallery=${3:-}
python=${PYTHON:-python}
fundus=${FUNDUS_SDK:-fundus-sdk}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
# `python -m training` and `python -m export` live in the checkout, beside this folder
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# 1. Train: writes $out/best.pt (the checkpoint with the best validation retrieval score).
#    The trunk-feature cache goes beside it; later flags in TRAIN_ARGS override these.
"$python" -m training train --data "$data" --out "$out" --cache-dir "$out/cache" "${train_args[@]}"

# 2. Export: one self-contained ONNX file with the preprocessing parameters, the weight
#    fingerprint and the test metrics in its metadata.
model=$out/mine.onnx
"$python" -m export "$out/best.pt" -o "$model" --version "${VERSION:-0.1.0-$(date +%Y%m%d)}"

# 3. Use it: every fundus-sdk command takes --model. An index remembers its model, and
#    refuses vectors from any other.
"$fundus" info --model "$model"
if [[ -n $gallery ]]; then
    rm -rf "$out/cases"
    "$fundus" index create "$out/cases" --model "$model"
    status=0
    "$fundus" index add "$out/cases" "$gallery" --recursive --quiet --model "$model" || status=$?
    [[ $status -le 1 ]] || exit "$status"  # 1: some photos skipped (named above)
    query=$(find "$gallery" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort | head -n 1)
    "$fundus" search "$query" --index "$out/cases" -k 5 --model "$model"
fi
