#!/usr/bin/env bash
# SAMI expert iteration on a tiny model, CPU only (gloo): the template the Slurm tests and CI
# submit to a two-node cluster through the same launcher as the GPU templates. The recipe is
# configs/recipe/tiny-llama.yaml (fp32, two short iterations); the tests set SAMI_BASE_HF,
# SAMI_RUN_DIR and SAMI_ITERATE_ARGS (their queries file).
#   sbatch --wait slurm/sami_tiny.sh
#SBATCH --job-name=sami-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
: "${SAMI_MODEL:=tiny-llama}" "${SAMI_RECIPE=tiny-llama}"
: "${SAMI_TP:=1}" "${SAMI_PP:=1}" "${SAMI_EP:=1}" "${SAMI_PARAMS_DTYPE:=fp32}"
: "${SAMI_GPUS_PER_NODE:=1}"
export SAMI_MODEL SAMI_RECIPE SAMI_TP SAMI_PP SAMI_EP SAMI_PARAMS_DTYPE SAMI_GPUS_PER_NODE
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_main
