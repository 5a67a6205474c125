#!/usr/bin/env bash
# Single-node launcher: torchrun over this machine's GPUs (or CPU processes).
#
#   recipes/launch/torchrun.sh [--config] CONFIG [key.sub=value ...] [--resume]
#
# Environment:
#   NPROC        processes on this node (default: number of GPUs nvidia-smi lists, or 2 without GPUs)
#   LOG_DIR      if set, torchrun writes one stdout/stderr file per rank under it (and tees to the console)
#   TORCHRUN     the torchrun command (default: torchrun)
#   DRY_RUN=1    print the command instead of running it
#
# Examples:
#   recipes/launch/torchrun.sh recipes/tiny_cpu.yaml
#   NPROC=8 recipes/launch/torchrun.sh recipes/qwen2.5_math_1.5b_tbrm_n1.yaml parallel.tp=2
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then
  usage
  exit 0
fi
if [[ $# -ge 1 && $1 == --config ]]; then
  shift
fi
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
config=$1
shift

gpu_count() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  echo "${n:-0}"
}

if [[ -z ${NPROC:-} ]]; then
  NPROC=$(gpu_count)
  if [[ $NPROC -eq 0 ]]; then
    NPROC=2  # CPU: two gloo processes (the tiny recipes use TP or DP of 2)
  fi
fi
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "torchrun.sh: NPROC must be a positive integer, got '$NPROC'" >&2
  exit 2
fi

read -r -a torchrun <<<"${TORCHRUN:-torchrun}"
# --standalone: a local c10d rendezvous on a free port, so two runs on one machine do not collide;
# --local-addr: the ranks reach it on loopback, not on the host's FQDN (unresolvable in some containers).
cmd=("${torchrun[@]}" --standalone --local-addr=127.0.0.1 --nnodes=1 "--nproc-per-node=$NPROC")
if [[ -n ${LOG_DIR:-} ]]; then
  mkdir -p "$LOG_DIR"
  cmd+=("--log-dir=$LOG_DIR" --tee=3)
fi
cmd+=(-m megatron_tbrm.train --config "$config" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
