#!/bin/bash
# Multi-node pretraining under Slurm: one accelerate launcher per node, 8 GPUs each.
#   sbatch configs/slurm_pretrain.sh configs/pretrain/toy.yaml
#SBATCH --job-name=flowalign-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
CONFIG=${1:-configs/pretrain/toy.yaml}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --config_file configs/accelerate/multinode.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port 29500 \
  -m base_model.pretrain --config $CONFIG --output_dir runs/pretrain-$SLURM_JOB_ID"
