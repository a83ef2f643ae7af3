#!/bin/bash
# Multi-node pretraining under SLURM: one `accelerate launch` per node (started by srun), each
# spawning one process per GPU, each running the packaged entry point (-m llm_refine.train), so no
# checkout is needed. Submit from the directory holding the config and launch/ (a checkout, or
# `llm-refine examples copy slurm launch/ && llm-refine examples copy multinode launch/`):
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh recipes/pretrain_tiny.yaml --set model.size=1.3b ...
# ACCEL_CONFIG picks the engine (default DDP template; e.g. launch/fsdp.yaml, launch/deepspeed_zero3.yaml);
# the node count, process count, rank and rendezvous address are passed on the command line and
# override the file. Resubmitting the same job resumes from the latest checkpoint in output_dir.
# GPUS_PER_NODE is the number of processes per node (default: the GPUs Slurm gave the node); on CPU
# nodes use ACCEL_CONFIG=launch/multinode_cpu.yaml GPUS_PER_NODE=<processes per node> OMP_NUM_THREADS=<cores per process>.
# MASTER_ADDR defaults to the allocation's first node name; set it where node names do not resolve.
#SBATCH --job-name=llm-refine-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

ACCEL_CONFIG=${ACCEL_CONFIG:-launch/multinode.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Tokenize and pack the data once (one task) into the shared cache before the ranks start: on a
# big corpus this takes longer than the collective timeout the waiting ranks would otherwise hit.
# Set LLM_REFINE_CACHE to a shared filesystem path. A no-op when the cache is already filled.
srun --ntasks=1 --nodes=1 python -m llm_refine.train "$@" --prepare-only

# Single quotes: SLURM_NODEID is expanded by each node's shell, not here.
srun --ntasks="${NNODES}" --ntasks-per-node=1 bash -c '
  accelerate launch \
    --config_file "'"${ACCEL_CONFIG}"'" \
    --num_machines "'"${NNODES}"'" \
    --num_processes "'"$((NNODES * GPUS_PER_NODE))"'" \
    --machine_rank "${SLURM_NODEID}" \
    --main_process_ip "'"${MASTER_ADDR}"'" \
    --main_process_port "'"${MASTER_PORT}"'" \
    --rdzv_backend static \
    -m llm_refine.train "$@"
' _ "$@"
