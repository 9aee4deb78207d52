#!/usr/bin/env bash
# SAMI expert iteration for Llama 3 70B on 4 nodes x 8 GPUs: TP 8 x PP 4 (DP 1; more nodes add
# DP). The recipe (RMSprop, no recomputation on 80 GB GPUs, lr, steps, vLLM generation with TP 8)
# is configs/recipe/llama3-70b.yaml; this template holds the allocation and the layout.
#   sbatch slurm/sami_70b.sh                     # defaults below
#   SAMI_BASE_HF=/models/Meta-Llama-3-70B SAMI_RUN_DIR=/scratch/runs/70b sbatch --nodes=8 slurm/sami_70b.sh
# Partition, account and time: sbatch -p/-A/-t, or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT.
#SBATCH --job-name=sami-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
: "${SAMI_MODEL:=llama3-70b}" "${SAMI_RECIPE=llama3-70b}"
: "${SAMI_BASE_HF:=/models/Meta-Llama-3-70B}"
: "${SAMI_TP:=8}" "${SAMI_PP:=4}" "${SAMI_EP:=1}"
export SAMI_MODEL SAMI_RECIPE SAMI_BASE_HF SAMI_TP SAMI_PP SAMI_EP
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_main
