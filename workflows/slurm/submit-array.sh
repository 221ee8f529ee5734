#!/usr/bin/env bash
# Submit array.sbatch with one task per slide of SLIDES (at most MAX_PARALLEL at a time):
#   workflows/slurm/submit-array.sh slides.txt results/ pruned20x.pt [sbatch options...]
# e.g. ... -p gpu -A myproj --gres=gpu:1 --cpus-per-task=8 --time=04:00:00
# Prints the array job id. Env: MAX_PARALLEL (default 20), LOG_DIR (default OUT/logs),
# WSI_NUCLEI_PROLOGUE / WSI_NUCLEI_ARGS / WSI_NUCLEI_WORKERS / WSI_NUCLEI_CMD (see
# array.sbatch), SBATCH (the sbatch command, default sbatch).
# Re-running it after a partial run is safe: finished slides are skipped by each task.
set -euo pipefail

usage() { echo "usage: $(basename "$0") SLIDES OUT MODEL [sbatch options...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
here=$(cd "$(dirname "$0")" && pwd -P)
slides=$1 out=$2 model=$3
shift 3

[ -f "$slides" ] || { echo "$(basename "$0"): slide list not found: $slides" >&2; exit 2; }
# line i of the list is array task i: refuse blank lines rather than run empty tasks
n=$(grep -c . "$slides" || true)
blank=$(grep -c '^[[:space:]]*$' "$slides" || true)
[ "$n" -gt 0 ] || { echo "$(basename "$0"): $slides lists no slides" >&2; exit 2; }
[ "$blank" -eq 0 ] || { echo "$(basename "$0"): $slides has $blank blank line(s); remove them" >&2; exit 2; }
max=${MAX_PARALLEL:-20}
[[ "$max" =~ ^[1-9][0-9]*$ ]] || { echo "MAX_PARALLEL must be a positive integer" >&2; exit 2; }

abspath() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd -P)" "$(basename "$1")"); }
mkdir -p "$out"
SLIDES=$(abspath "$slides")
OUT=$(abspath "$out")
# a model that is a file is passed as an absolute path; otherwise it is a shipped name
if [ -e "$model" ]; then MODEL=$(abspath "$model"); else MODEL=$model; fi
log_dir=${LOG_DIR:-$OUT/logs}
mkdir -p "$log_dir"   # SLURM does not create the --output folder: jobs would fail silently
export SLIDES OUT MODEL

read -r -a sbatch <<<"${SBATCH:-sbatch}"
echo "$(basename "$0"): $n slide(s), array 1-$n%$max, logs in $log_dir" >&2
exec "${sbatch[@]}" --parsable --export=ALL --array="1-${n}%${max}" \
  --output="$log_dir/%x_%A_%a.log" "$@" "$here/array.sbatch"
