#!/usr/bin/env bash
# Segment slides with Dask workers running as SLURM jobs (dask-jobqueue): the scheduler and
# the orchestration run where this script runs, the tiles run in the worker jobs.
#
# From a login node (keep the session alive: tmux/screen):
#   workflows/slurm/run-dask-slurm.sh OUT MODEL SLIDE_OR_DIR...
# or as a small orchestrating job (the node must be allowed to run sbatch):
#   sbatch workflows/slurm/run-dask-slurm.sh OUT MODEL SLIDE_OR_DIR...
#
# Env: CLUSTER_CONFIG (default: cluster.yaml beside this script), WSI_NUCLEI_ARGS (extra
# 'wsi-nuclei run' arguments, e.g. "--tile-size 1024 --gzip"), WSI_NUCLEI_PROLOGUE (shell
# code that activates the environment), WSI_NUCLEI_CMD (default wsi-nuclei).
# Give this job a longer --time than the worker jobs' walltime: workers are replaced when
# they retire, the orchestrator is not.
#SBATCH --job-name=wsi-nuclei-dask
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=24:00:00
#SBATCH --output=wsi-nuclei-dask_%j.log
set -euo pipefail

usage() { echo "usage: $(basename "$0") OUT MODEL SLIDE_OR_DIR..." >&2; exit 2; }
[ $# -ge 3 ] || usage
out=$1 model=$2
shift 2

# Under sbatch this file runs from a spool copy, so "beside this script" is the submit dir's
if [ -z "${CLUSTER_CONFIG:-}" ]; then
  for candidate in "$(cd "$(dirname "$0")" && pwd -P)/cluster.yaml" \
                   "${SLURM_SUBMIT_DIR:-.}/workflows/slurm/cluster.yaml"; do
    if [ -f "$candidate" ]; then CLUSTER_CONFIG=$candidate; break; fi
  done
fi
[ -f "${CLUSTER_CONFIG:-}" ] || { echo "$(basename "$0"): set CLUSTER_CONFIG to a cluster.yaml" >&2; exit 2; }

if [ -n "${WSI_NUCLEI_PROLOGUE:-}" ]; then
  # shellcheck disable=SC1090  # user-supplied environment set-up
  eval "$WSI_NUCLEI_PROLOGUE"
fi
read -r -a cmd <<<"${WSI_NUCLEI_CMD:-wsi-nuclei}"
read -r -a extra <<<"${WSI_NUCLEI_ARGS:-}"

echo "$(basename "$0"): $* -> $out with $CLUSTER_CONFIG (on $(hostname))" >&2
exec "${cmd[@]}" run "$@" --model "$model" --out "$out" --cluster slurm \
  --cluster-config "$CLUSTER_CONFIG" ${extra[@]+"${extra[@]}"}
