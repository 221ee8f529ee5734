#!/usr/bin/env bash
# List the whole-slide images under one or more folders, one absolute path per line,
# sorted, for array.sbatch / submit-array.sh (slide names must be unique):
#   workflows/slurm/make-slide-list.sh /data/cohort1 [/data/cohort2 ...] > slides.txt
# Folders are searched recursively (symlinks followed). Recognised extensions (case-
# insensitive) can be replaced with SLIDE_EXTENSIONS="svs ndpi". Line i of the list is
# array task i, so do not edit the list while an array that uses it is queued.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $(basename "$0") DIR [DIR...] > slides.txt" >&2; exit 2; }
read -r -a exts <<<"${SLIDE_EXTENSIONS:-svs tif tiff ndpi mrxs scn vms vmu bif svslide}"

expr=()
for ext in "${exts[@]}"; do
  [ ${#expr[@]} -eq 0 ] || expr+=(-o)
  expr+=(-iname "*.${ext#.}")
done

for dir in "$@"; do
  [ -d "$dir" ] || { echo "$(basename "$0"): not a folder: $dir" >&2; exit 2; }
done

list=$(for dir in "$@"; do
  root=$(cd "$dir" && pwd -P)
  find -L "$root" -type f \( "${expr[@]}" \) -print
done | LC_ALL=C sort -u)

if [ -z "$list" ]; then
  echo "$(basename "$0"): no slides (${exts[*]}) under $*" >&2
  exit 1
fi
# the output folder is OUT/<file stem>: two slides with one stem would overwrite each other
dups=$(printf '%s\n' "$list" | sed 's|.*/||; s|\.[^.]*$||' | LC_ALL=C sort | uniq -d)
if [ -n "$dups" ]; then
  echo "$(basename "$0"): several slides share a name (their outputs would collide): ${dups//$'\n'/ }" >&2
  exit 1
fi
printf '%s\n' "$list"
