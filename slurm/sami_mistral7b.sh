#!/usr/bin/env bash
# SAMI expert iteration for Mistral 7B on 1 node x 8 GPUs: TP 4 x DP 2. The recipe (AdamW with
# the distributed optimizer, lr, steps, vLLM generation with TP 4) is configs/recipe/mistral-7b.yaml;
# this template holds the allocation and the layout.
#   sbatch slurm/sami_mistral7b.sh
#SBATCH --job-name=sami-mistral7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
: "${SAMI_MODEL:=mistral-7b}" "${SAMI_RECIPE=mistral-7b}"
: "${SAMI_BASE_HF:=/models/Mistral-7B-v0.1}"
: "${SAMI_TP:=4}" "${SAMI_PP:=1}" "${SAMI_EP:=1}"
export SAMI_MODEL SAMI_RECIPE SAMI_BASE_HF SAMI_TP SAMI_PP SAMI_EP
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_main
