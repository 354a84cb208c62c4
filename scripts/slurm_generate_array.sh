#!/usr/bin/env bash
# Stage 1 on a Slurm cluster: an array job of N tasks, task I running `q2g generate --shard I/N`, all
# writing into one OUT folder on a shared file system; then a merge job that starts when every task
# has ended (afterany) and runs `q2g generate --merge-shards` with the same options.
#
#   bash scripts/slurm_generate_array.sh 8 dataset/ --backend vllm --teacher Qwen/Qwen2.5-7B-Instruct --datasets gsm8k math
#   SBATCH_ARGS="--partition gpu --gres gpu:1 --time 12:00:00" bash scripts/slurm_generate_array.sh 8 dataset/ ...
#   ARRAY=3,5 bash scripts/slurm_generate_array.sh 8 dataset/ ...    # rerun only tasks 3 and 5 (+ a new merge)
#
# Everything after OUT is passed to every `q2g generate` as it is. Each task is one process on its
# node's GPUs (--backend vllm; add --tensor-parallel-size and a matching --gres for a model that
# needs more than one GPU), or --backend openai --base-url at a server (docs/multi_node.md).
# A task that dies: Slurm requeues it on a node failure (--requeue), and a rerun of the same task
# resumes from the batches already on disk, so it ends with exactly the records of an uninterrupted
# shard. The last shard to finish merges on its own; the merge job is the check: it fails with
# "shard(s) I/N not complete yet" while one is missing (then rerun those tasks with ARRAY=...).
# Logs: slurm-logs/ (LOGS=...). The job environment is the submitting shell's (activate the venv first).
set -euo pipefail

if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N OUT [q2g generate options...]   (N: number of shards, a positive integer)" >&2
    exit 2
fi
n=$1
out=$2
shift 2
q2g=${Q2G:-q2g}
logs=${LOGS:-slurm-logs}
mkdir -p "$logs"
opts=$(printf ' %q' "$@" --out "$out")

# shellcheck disable=SC2086  # SBATCH_ARGS is a list of sbatch options
array=$(sbatch --parsable --job-name=q2g-generate --array="${ARRAY:-0-$((n - 1))}" --requeue ${SBATCH_ARGS:-} \
    --output="$logs/generate-%A-%a.log" \
    --wrap="$q2g generate$opts --shard \$SLURM_ARRAY_TASK_ID/$n")
array=${array%%;*} # --parsable prints ID or ID;CLUSTER
# shellcheck disable=SC2086
merge=$(sbatch --parsable --job-name=q2g-merge --dependency="afterany:$array" ${MERGE_SBATCH_ARGS:-} \
    --output="$logs/merge-%j.log" \
    --wrap="$q2g generate$opts --merge-shards")
merge=${merge%%;*}
echo "submitted: shards $array (tasks ${ARRAY:-0-$((n - 1))} of $n), merge $merge (after them) -> $out"
