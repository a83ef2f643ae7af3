#!/bin/bash
# Data-parallel pretraining with plain torchrun (no accelerate config): one process per GPU, or per
# CPU core with NPROC and no GPU (the Trainer then runs DDP over gloo with use_cpu).
#   NPROC=8 launch/torchrun.sh recipes/pretrain_tiny.yaml --set train.max_steps=1000
# Multi-node: NNODES=4 NODE_RANK=r MASTER_ADDR=host launch/torchrun.sh RECIPE.yaml ...
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nproc_per_node "${NPROC}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}" \
  --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
  -m llm_refine.train "$@"
