#!/usr/bin/env bash
# Clinic IT folder job with the `fundus-sdk` command: embed a folder of photos, build a case
# index from the embeddings, and search it with one photo.
#
# Usage: examples/embed_folder.sh [-h] FOLDER [QUERY_PHOTO] [LABELS_CSV]
#
#   FOLDER        photos to index (.jpg .jpeg .png .tif .tiff .bmp; sub-folders too)
#   QUERY_PHOTO   photo to search with (default: the first photo found in FOLDER)
#   LABELS_CSV    optional CSV with columns image, grade, ... (kept as case metadata)
#
# Environment: OUT_DIR (default ./fundus-out) receives embeddings.npz and the index cases/;
# FUNDUS_SDK is the command to run (default: fundus-sdk on PATH); K results (default 5).
#
# Exit status: 0 done (photos that could not be read are listed on stderr and skipped);
# anything else: a step failed (see the fundus-sdk exit codes in `fundus-sdk --help`).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
    usage
    exit 0
elif [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi

folder=$1
fundus=${FUNDUS_SDK:-fundus-sdk}
out=${OUT_DIR:-./fundus-out}
k=${K:-5}
mkdir -p "$out"

# fundus-sdk exits 1 when only some inputs failed (they are named on stderr): keep going then.
allow_partial() {
    local status=0
    "$@" || status=$?
    if [[ $status -eq 1 ]]; then
        echo "note: some photos were skipped (see above)" >&2
    elif [[ $status -ne 0 ]]; then
        exit "$status"
    fi
}

# 1. Embed every photo of the folder: one vector per photo, with its path and content hash.
allow_partial "$fundus" embed "$folder" --recursive --quiet -o "$out/embeddings.npz"

# 2. A case index for these vectors (created once; re-runs only add what is new).
if [[ ! -f $out/cases/cases.sqlite ]]; then
    "$fundus" index create "$out/cases"
fi
labels=()
if [[ $# -ge 3 ]]; then
    labels=(--labels "$3")
fi
allow_partial "$fundus" index add "$out/cases" "$out/embeddings.npz" "${labels[@]}"
"$fundus" index info "$out/cases"

# 3. Search with one photo: the nearest cases with score, grade, key and path.
query=${2:-}
if [[ -z $query ]]; then
    query=$(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \
        -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.bmp' \) | sort | head -n 1)
fi
"$fundus" search "$query" --index "$out/cases" -k "$k"
