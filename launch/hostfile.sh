#!/usr/bin/env bash
# Print a DeepSpeed hostfile ("<host> slots=<n>" per line) for the nodes of this SLURM job.
#
#   launch/hostfile.sh SLOTS_PER_NODE [NODELIST] > hostfile
#
# NODELIST defaults to $SLURM_JOB_NODELIST (compressed form such as "gpu[07-09,12]" is expanded by
# `scontrol show hostnames`). The order is SLURM's, so node_rank = $SLURM_NODEID matches the line.
set -euo pipefail

slots=${1:?usage: launch/hostfile.sh SLOTS_PER_NODE [NODELIST]}
nodelist=${2:-${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set: run inside a SLURM job or pass NODELIST}}
if ! [[ $slots =~ ^[1-9][0-9]*$ ]]; then
    echo "hostfile.sh: SLOTS_PER_NODE must be a positive integer, got '$slots'" >&2
    exit 2
fi
scontrol show hostnames "$nodelist" | while read -r host; do
    echo "$host slots=$slots"
done
