#!/usr/bin/env bash
# Submit the whole pipeline to SLURM in one line: an array over shards of the subject list, then the
# combine step, which starts only when every shard succeeded. Prints both job ids.
#
#   cluster/submit.sh --input_dir IN --output_dir OUT [pipeline args, e.g. --strict_model]
#
# SPIKE_GRIDS_SHARDS=N      number of array tasks (default: one per subject folder or --subjects entry,
#                           at most SPIKE_GRIDS_MAX_SHARDS, default 50; extra shards find nothing to do)
# SPIKE_GRIDS_SBATCH_ARGS   extra sbatch options for the array, e.g. "--partition=long --mem=128G"
#                           (SBATCH_ACCOUNT, SBATCH_PARTITION, ... apply to both jobs, as usual)
# Job output goes to OUT/slurm_logs/, the pipeline's logs to OUT/processing_shard<K>of<N>.log.
# Re-running the same command later is cheap: finished subjects are skipped.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SPIKE_GRIDS_REPO=${SPIKE_GRIDS_REPO:-$(dirname "$here")}  # the jobs run this checkout

input_dir="" output_dir="" only="" prev=""
for arg in "$@"; do  # the few arguments submit.sh needs; all of them go to the pipeline
    case "$prev" in
        --input_dir) input_dir=$arg ;;
        --output_dir) output_dir=$arg ;;
        --subjects) only=$arg ;;
    esac
    case "$arg" in
        --input_dir=*) input_dir=${arg#*=} ;;
        --output_dir=*) output_dir=${arg#*=} ;;
        --subjects=*) only=${arg#*=} ;;
        --shard | --shard=* | --combine_only)
            echo "submit.sh makes the shards and the combine job itself: drop $arg" >&2; exit 2 ;;
    esac
    prev=$arg
done
[ -d "$input_dir" ] && [ -n "$output_dir" ] || {
    echo "usage: $0 --input_dir IN --output_dir OUT [pipeline args]  (IN must exist)" >&2; exit 2; }

shopt -s nullglob
folders=("$input_dir"/subject_*/ "$input_dir"/Subjects/subject_*/)
IFS=, read -ra listed <<<"$only"
subjects=${#folders[@]}; [ -z "$only" ] || subjects=${#listed[@]}
cap=${SPIKE_GRIDS_MAX_SHARDS:-50}
shards=${SPIKE_GRIDS_SHARDS:-$(( subjects < cap ? subjects : cap ))}
[ "$shards" -ge 1 ] || { echo "no subject_* folders in $input_dir (or $input_dir/Subjects)" >&2; exit 2; }

mkdir -p "$output_dir/slurm_logs"
# shellcheck disable=SC2086  # SPIKE_GRIDS_SBATCH_ARGS is a list of options
array=$(sbatch --parsable --array="1-$shards" --output="$output_dir/slurm_logs/%x_%A_%a.out" \
    ${SPIKE_GRIDS_SBATCH_ARGS:-} "$here/spike_grids_array.sbatch" "$@")
array=${array%%;*}
combine=$(sbatch --parsable --dependency="afterok:$array" --output="$output_dir/slurm_logs/%x_%j.out" \
    "$here/spike_grids_combine.sbatch" "$@")
combine=${combine%%;*}
echo "array job $array ($shards shards of $subjects subjects)," \
    "combine job $combine (after the array succeeds)"
echo "watch: squeue -j $array,$combine   logs: $output_dir/slurm_logs/ and $output_dir/processing_shard*.log"
