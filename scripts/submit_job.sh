#!/usr/bin/env bash
# Submit an rlhf_dist command to a running Ray cluster with `ray job submit`.
#
#   bash scripts/submit_job.sh [--module rlhf_dist.train] [--no-wait] [-- key=value ...]
#
# The job's driver runs on the head node, in this checkout (every node has it, set up with
# scripts/setup.sh, at the same path), joins the cluster (resources.ray_address=auto) and writes
# its outputs under this checkout's outputs/ (or the hydra.run.dir you pass). Its runtime
# environment sets the variables below on the driver and every actor.
# Env: RAY_ADDRESS (job API, default http://127.0.0.1:8265: the head itself, or an SSH tunnel to it).
# The W&B key is not passed here (a runtime environment is stored in Ray's job table): export
# WANDB_API_KEY on each node before scripts/ray_cluster.sh starts Ray there, or run `wandb login`.
set -euo pipefail
cd "$(dirname "$0")/.."

module=rlhf_dist.train
wait=()
while [ $# -gt 0 ]; do
    case "$1" in
        --module) module=$2; shift 2 ;;
        --no-wait) wait=(--no-wait); shift ;;
        --) shift; break ;;
        *) echo "submit_job.sh: unknown option $1 (overrides go after --)" >&2; exit 2 ;;
    esac
done

export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # the job API checks the cluster's token (~/.ray/auth_token)
env_vars='"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"'
# Outputs land in this checkout unless the overrides choose a dir (Hydra's ${now:...} is kept literal).
run_dir=()
if ! printf '%s\n' "$@" | grep -q '^hydra\.run\.dir='; then
    run_dir=("hydra.run.dir=$(pwd)/outputs/\${now:%Y-%m-%d}/\${now:%H-%M-%S}")
fi
entrypoint=$(printf '%q ' cd "$(pwd)")"&& "$(printf '%q ' .venv/bin/python -m "$module" resources.ray_address=auto "${run_dir[@]}" "$@")
echo "submit_job.sh: $module on $RAY_ADDRESS"
# ray job submit quotes each word of the entrypoint, so the cd + command go through one bash -c.
exec .venv/bin/ray job submit "${wait[@]}" --runtime-env-json="{\"env_vars\": {$env_vars}}" -- bash -c "$entrypoint"
