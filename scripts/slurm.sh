#!/usr/bin/env bash
# Run a taxoclip command across SLURM nodes with torchrun (one launcher per node, one process per GPU).
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm.sh features shards/ -o features/
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm.sh train lit --features features/ -o model/ --epochs 18
#
# Folders must be on a filesystem every node sees. Feature extraction splits the shards across all
# ranks and rank 0 merges the cache; LiT training gathers image embeddings across ranks for one
# global loss, and rank 0 writes checkpoints, so re-submitting the same command resumes the run.
#SBATCH --job-name=taxoclip
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=taxoclip-%j.log
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PYTHON=${TAXOCLIP_PYTHON:-python3}  # e.g. /path/to/taxoclip/.venv/bin/python

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
srun "$PYTHON" -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$HEAD_NODE:29500" \
  -m taxoclip "$@"
