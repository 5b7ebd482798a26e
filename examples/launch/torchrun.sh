#!/usr/bin/env bash
# One node: examples/launch/torchrun.sh CONFIG [key=value ...]   (NPROC ranks, default: the config's world size
# or 8). Multi-node without Slurm: run it on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}; shift
nproc=${NPROC:-8}
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$nproc" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m megatron_rlvr.cli train --config "$config" "$@"
