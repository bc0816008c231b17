#!/bin/bash
# kimi-rl on one node, one process per GPU, started by torchrun.
#
#   launch/torchrun.sh [hydra overrides ...]
#   NPROC_PER_NODE=8 RUN_DIR=runs/tp8 launch/torchrun.sh backend=megatron \
#       backend.tensor_parallel=8 model.path=/models/my-7b data.path=problems.jsonl
#
# Environment: NPROC_PER_NODE (default: the number of GPUs, else 1), RUN_DIR (default
# runs/<date>/<time>, chosen once here so that every rank writes to the same directory),
# TORCHRUN (default `torchrun`, e.g. "/path/.venv/bin/torchrun" or
# "python -m torch.distributed.run"). A RUN_DIR with a checkpoint is resumed.
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE}" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
RUN_DIR=${RUN_DIR:-runs/$(date +%Y-%m-%d/%H-%M-%S)}
TORCHRUN=${TORCHRUN:-torchrun}

args=("run_dir=${RUN_DIR}")
if [ -f "${RUN_DIR}/checkpoints/latest" ]; then
    args+=("resume=${RUN_DIR}")
fi
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec ${TORCHRUN} --standalone --nnodes=1 --nproc-per-node="${NPROC_PER_NODE}" \
    -m kimi_rl.cli train "${args[@]}" "$@"
