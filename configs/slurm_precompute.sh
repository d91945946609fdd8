#!/bin/bash
# Precompute a cache on shared storage with every GPU of the allocation (each process takes disjoint shards).
#   sbatch configs/slurm_precompute.sh data/images.parquet /shared/cache/images --image_space vae:/m/vae --resolution 512
#SBATCH --job-name=flowalign-precompute
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
DATA=$1; OUT=$2; shift 2
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port 29500 \
  -m base_model.precompute --dataset $DATA --output $OUT $*"
