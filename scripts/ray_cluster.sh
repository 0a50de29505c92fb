#!/usr/bin/env bash
# Start or stop this node's part of a Ray cluster for rlhf_dist (run inside the project's venv
# set-up: bash scripts/setup.sh [cpu|gpu] first, on every node, at the same path).
#
#   bash scripts/ray_cluster.sh head   [--num-gpus N] [--num-cpus N]   # on the head node
#   bash scripts/ray_cluster.sh worker HEAD_IP [--num-gpus N] ...        # on every other node
#   bash scripts/ray_cluster.sh status
#   bash scripts/ray_cluster.sh stop
#
# Env: RAY_PORT (GCS port, default 6379), RAY_DASHBOARD_HOST (default 127.0.0.1: the dashboard and
# its job API listen on the head's loopback only; reach it with an SSH tunnel, see docs/cluster.md).
# Ray's token authentication stays on: the head writes its token to ~/.ray/auth_token; copy that
# file to every worker node (or set RAY_AUTH_TOKEN there) before starting it.
set -euo pipefail
cd "$(dirname "$0")/.."

ray=.venv/bin/ray
port=${RAY_PORT:-6379}
dashboard_host=${RAY_DASHBOARD_HOST:-127.0.0.1}
cmd=${1:-}
[ -n "$cmd" ] && shift
[ -x "$ray" ] || { echo "ray_cluster.sh: $ray not found; run bash scripts/setup.sh first" >&2; exit 2; }
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # clients (status, workers, drivers) present the token

case "$cmd" in
    head)
        # The dashboard hosts the job API that `ray job submit` (scripts/submit_job.sh) talks to.
        "$ray" start --head --port="$port" --include-dashboard=true --dashboard-host="$dashboard_host" \
            --dashboard-port=8265 "$@"
        echo "ray_cluster.sh: head started; on the workers run: bash scripts/ray_cluster.sh worker $(hostname -I | awk '{print $1}')"
        ;;
    worker)
        head=${1:?usage: ray_cluster.sh worker HEAD_IP [ray start options]}
        shift
        if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f "$HOME/.ray/auth_token" ]; then
            echo "ray_cluster.sh: no Ray auth token here: copy ~/.ray/auth_token from the head node" >&2
            exit 2
        fi
        "$ray" start --address="$head:$port" "$@"
        ;;
    status)
        "$ray" status
        ;;
    stop)
        "$ray" stop
        ;;
    *)
        sed -n '2,13p' "$0" >&2
        exit 2
        ;;
esac
