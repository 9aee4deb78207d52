#!/usr/bin/env bash
# SAMI expert iteration for Mixtral 8x7B on 4 nodes x 8 GPUs: PP 4 x EP 8 (experts split over
# the 8 GPUs of a node; MoE under TP needs sequence parallelism). The recipe (summarization on
# TL;DR, RMSprop, no recomputation on 80 GB GPUs, lr, steps, vLLM generation with TP 8) is
# configs/recipe/mixtral-8x7b.yaml; this template holds the allocation and the layout.
#   sbatch slurm/sami_mixtral.sh
#   SAMI_BASE_HF=/models/Mixtral-8x7B-v0.1 SAMI_PP=2 sbatch --nodes=2 slurm/sami_mixtral.sh
#SBATCH --job-name=sami-mixtral
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
: "${SAMI_MODEL:=mixtral-8x7b}" "${SAMI_RECIPE=mixtral-8x7b}"
: "${SAMI_BASE_HF:=/models/Mixtral-8x7B-v0.1}"
: "${SAMI_TP:=1}" "${SAMI_PP:=4}" "${SAMI_EP:=8}"
export SAMI_MODEL SAMI_RECIPE SAMI_BASE_HF SAMI_TP SAMI_PP SAMI_EP
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_main
