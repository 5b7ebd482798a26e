#!/usr/bin/env bash
# Slurm: NODES=32 sbatch --nodes 32 --gpus-per-node 8 examples/launch/slurm.sh CONFIG [key=value ...]
# One torchrun per node (srun), rendezvous on the first node of the allocation. Check the layout first:
#   megatron-rlvr train --config CONFIG --dry-run
#SBATCH --job-name=megatron-rlvr
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch examples/launch/slurm.sh CONFIG [key=value ...]}; shift
nodes=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
gpus=${GPUS_PER_NODE:-8}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --nodes "$nodes" --ntasks-per-node 1 torchrun \
  --nnodes "$nodes" --nproc-per-node "$gpus" \
  --rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "${SLURM_JOB_ID:-rlvr}" \
  -m megatron_rlvr.cli train --config "$config" "$@"
