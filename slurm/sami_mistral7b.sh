#!/usr/bin/env bash
# SAMI expert iteration for Mistral 7B on 1 node x 8 GPUs: TP 4 x DP 2, AdamW with the
# distributed optimizer (the paper's mistral recipe), vLLM generation with TP 4.
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
: "${SAMI_MODEL:=mistral-7b}"
: "${SAMI_BASE_HF:=/models/Mistral-7B-v0.1}"
: "${SAMI_TP:=4}" "${SAMI_PP:=1}" "${SAMI_EP:=1}"
: "${SAMI_ITERATE_ARGS:=iterations=3 queries.source=hh-rlhf queries.subset=helpful-base queries_per_iteration=1024 \
generation.backend=vllm generation.tensor_parallel=4 train.steps=6 train.queries_per_step=128 \
train.optimizer.lr=5e-7 train.precision.params_dtype=bf16}"
export SAMI_MODEL SAMI_BASE_HF SAMI_TP SAMI_PP SAMI_EP SAMI_ITERATE_ARGS
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_main
