#!/usr/bin/env bash
# GPU smoke test: a short real PPO run on the embedded tiny model (built locally, nothing
# downloaded) with vLLM on CUDA, DeepSpeed ZeRO-2 in bf16, and the new weights sent to the
# engine after every step. Prints the timings and the rollout/train logprob gap.
#
#   bash scripts/gpu_smoke.sh                 # set-up (GPU stack) if needed, then the run
#   RLHF_SMOKE_STEPS=8 bash scripts/gpu_smoke.sh extra.key=value ...
#   RLHF_SMOKE_FAMILY=llama-tied bash scripts/gpu_smoke.sh   # a tiny random-init model of a family
#                                   # (rlhf_dist.models.tiny.FAMILIES: llama-tied, qwen2, qwen3, gemma3, ...)
#
# Two or more GPUs: the engine has a GPU to itself and the weights go over vLLM's NCCL
# weight-transfer backend (trainer and engine on different GPUs). One GPU: everything colocated
# on it (resources=gpu_colocated): the engine sleeps while the trainer trains and the weights go
# over CUDA IPC, because NCCL refuses two ranks of one communicator on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu_smoke.sh: nvidia-smi not found; this needs an NVIDIA GPU" >&2; exit 2; }
gpus=$(nvidia-smi -L | grep -c '^GPU ')
[ "$gpus" -ge 1 ] || { echo "gpu_smoke.sh: no GPU listed by nvidia-smi -L" >&2; exit 2; }

bash scripts/setup.sh gpu

out=${RLHF_SMOKE_DIR:-outputs/gpu_smoke/$(date +%Y%m%d-%H%M%S)}
common=(
    "hydra.run.dir=$out" "total_steps=${RLHF_SMOKE_STEPS:-4}" trainer=zero2 model.dtype=bfloat16
    trainer.world_size=1 rollout.num_engines=1 logger.progress_bar=false checkpoint.every_steps=0
)
if [ -n "${RLHF_SMOKE_FAMILY:-}" ]; then
    common+=("model.path=$(.venv/bin/python -m rlhf_dist.models.tiny --family "$RLHF_SMOKE_FAMILY" | tail -n 1)")
fi
if [ "$gpus" -ge 2 ]; then
    layout="separate placement, NCCL weight transfer, $gpus GPUs"
    # The engine takes a whole GPU; the four other actors share another one.
    placement=(
        resources=gpu_node resources.policy.gpus=0.25 resources.critic.gpus=0.25
        resources.reference.gpus=0.25 resources.reward.gpus=0.25
    )
else
    layout="colocated on 1 GPU, engine sleep/wake, CUDA IPC weight transfer"
    placement=(resources=gpu_colocated)
fi

echo "gpu_smoke.sh: $layout -> $out"
start=$(date +%s)
.venv/bin/python -m rlhf_dist.train "${common[@]}" "${placement[@]}" "$@"
echo "gpu_smoke.sh: run took $(( $(date +%s) - start )) s (start-up included)"

.venv/bin/python - "$out" "$layout" <<'PY'
import json, sys
from pathlib import Path

out, layout = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
print(f"\n{layout}")
print(f"{'step':>4} {'reward':>8} {'logprob_gap':>11} {'gen s':>6} {'train s':>7} {'sync s':>6} {'step s':>6}")
for r in rows:
    print(f"{r['step']:>4} {r['reward/mean']:>8.3f} {r['logprob_gap/mean']:>11.4f} {r['time/generate']:>6.2f} "
          f"{r['time/train']:>7.2f} {r['time/weight_sync']:>6.2f} {r['time/step']:>6.2f}")
summary = json.loads((out / "summary.json").read_text())
print(f"status {summary['status']}, logprob_gap/max {summary.get('logprob_gap/max')}")
PY
