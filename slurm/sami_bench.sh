#!/usr/bin/env bash
# The SAMI training benchmark that slurm/scaling_study.py submits at several node counts: sami-train
# for a fixed number of steps on fixed records, one task per GPU. Settings as in launcher.sh plus
# SAMI_BASE_CKPT, SAMI_BENCH_RECORDS and SAMI_TRAIN_ARGS (sami-train overrides, e.g. steps=10).
# Tasks and GPUs per node come from the submission (scaling_study.py passes them).
#SBATCH --job-name=sami-bench
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
: "${SAMI_MODEL:?set SAMI_MODEL (a catalogue name, e.g. llama3-8b)}"
export SAMI_MODEL
# shellcheck source=slurm/launcher.sh
source "${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launcher.sh"
sami_bench_main
