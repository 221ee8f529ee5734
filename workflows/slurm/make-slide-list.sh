#!/usr/bin/env bash
# List the whole-slide images of files and folders for array.sbatch / submit-array.sh, one
# "NAME<TAB>PATH" line per slide (absolute path, sorted by path):
#   workflows/slurm/make-slide-list.sh /data/cohort1 [/data/cohort2 ...] > slides.txt
# NAME is the slide's output folder, OUT/NAME/, named as 'wsi-nuclei run' names it (the
# rules live in pipeline/discovery.py; this script only calls them): folders are searched
# recursively (symlinks followed; hidden and *.zarr folders skipped), x.ome.tif -> x, and
# slides that share a name get NAME-<hash of the path>. Recognised extensions (case-
# insensitive) can be replaced with SLIDE_EXTENSIONS="svs ndpi". Line i of the list is
# array task i, so do not edit the list while an array that uses it is queued.
# WSI_NUCLEI_PYTHON: the Python to run (default python3; only its standard library is used).
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $(basename "$0") PATH [PATH...] > slides.txt" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd -P)
suffixes=()
[ -z "${SLIDE_EXTENSIONS:-}" ] || suffixes=(--suffixes "$SLIDE_EXTENSIONS")
# this checkout's pipeline/discovery.py, whichever environment is active
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "${WSI_NUCLEI_PYTHON:-python3}" -m pipeline.discovery \
  list ${suffixes[@]+"${suffixes[@]}"} -- "$@"
