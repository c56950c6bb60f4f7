#!/usr/bin/env bash
# Issue 14's full-settings tables on one lent accelerator: every method x objective x IPC 1/10/50
# x seeds 0-2 on Fashion-MNIST and cifar10-dev (ConvNet-D3, the configs' defaults: full recover
# iterations, 300 student epochs, the configs' teachers), then the cifar10-dev grid with a
# ResNet-18 (CIFAR stem) teacher and student. bench/accuracy.py runs WORKERS cells at once in
# separate processes sharing the device and resumes a killed grid from its finished cells, so a
# second call on the same machine finishes what a first one left.
#
#     bash bench/accuracy_gpu.sh                                  # FM + cifar together, then R18
#     GRIDS="resnet18" WORKERS=12 bash bench/accuracy_gpu.sh      # one grid (or: ... .sh resnet18)
#     DEADLINE_S=540 bash bench/accuracy_gpu.sh                   # stop every grid after 540 s
#     EXTRA="--ipcs 1 --seeds 0 --config.debug=True" WORKERS=1 bash bench/accuracy_gpu.sh  # smoke
#
# GRIDS is a list of groups run one after another; the grids of a group (joined by '+') run at
# once, WORKERS processes each, and share the device's memory evenly. DEADLINE_S (seconds from
# the start) stops a running grid with SIGTERM; its results JSON already holds every finished
# cell. Results go to bench/results/accuracy_<grid>_gpu.json (+ .md; resnet18:
# accuracy_cifar10_dev_resnet18_gpu.json), never over the CPU tables
# (accuracy_fashion_mnist.json, accuracy_cifar10_dev.json), and are copied to $OUT when it is
# set (the device tool's return folder; .whl/run.sh also logs there).
#
# On a machine without internet whose Python has JAX/Flax/Optax/Orbax but not ott-jax or
# ml-collections (this workplace's lent GPUs): `bash bench/offline_bundle.sh` here first, carry
# .whl and .dsets, and run `BUDGET=560 bash .whl/run.sh` there (wheels, import check, this script).
#
# Data: the configs read ../shared/datasets/{fashion-mnist,cifar10-dev}; where that folder is
# absent and ./.dsets holds the two datasets (bench/offline_bundle.sh copies them), it is linked in.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
W=${WORKERS:-7}
GRIDS=${*:-${GRIDS:-fashion_mnist+cifar10_dev resnet18}}  # arguments, as GRIDS, win
DEADLINE_S=${DEADLINE_S:-0}
START=$(date +%s)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/wmdd_jax_cache}
export PYTHONUNBUFFERED=1
if [ ! -e ../shared/datasets ] && [ -d .dsets ]; then
  mkdir -p ../shared && ln -s "$PWD/.dsets" ../shared/datasets
fi

results_of() {  # resnet18 -> accuracy_cifar10_dev_resnet18_gpu.json
  echo "bench/results/accuracy_${1/resnet18/cifar10_dev_resnet18}_gpu.json"
}

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  for grid in fashion_mnist cifar10_dev resnet18; do
    local r; r=$(results_of "$grid")
    [ -f "$r" ] && cp "$r" "${r%.json}.md" "$OUT/" 2>/dev/null
  done
  return 0
}

run_grid() {  # run_grid GRID WORKERS
  local grid=$1 w=$2 left=0 cfg=()
  if [ "$DEADLINE_S" -gt 0 ]; then
    left=$(( START + DEADLINE_S - $(date +%s) ))
    if [ "$left" -le 5 ]; then echo "[$grid] no time left, skipped"; return 0; fi
  fi
  case $grid in
    fashion_mnist|cifar10_dev) cfg=(--config "experiments/configs/$grid.py") ;;
    resnet18) cfg=(--config experiments/configs/cifar10_dev.py:resnet18) ;;
    *) echo "unknown grid $grid (fashion_mnist | cifar10_dev | resnet18)" >&2; return 2 ;;
  esac
  local extra=(); read -r -a extra <<<"${EXTRA:-}"
  local cmd=("$PY" -m bench.accuracy "${cfg[@]}" --workers "$w"
             --out "bench/runs/accuracy/${grid}_gpu" --results "$(results_of "$grid")"
             "${extra[@]}")
  echo "[$grid] ${cmd[*]} (${left}s left)"
  if [ "$left" -gt 0 ]; then
    timeout -s TERM -k 20 "$left" "${cmd[@]}" 2>&1 | sed -u "s/^/[$grid] /"
  else
    "${cmd[@]}" 2>&1 | sed -u "s/^/[$grid] /"
  fi
  local rc=${PIPESTATUS[0]}
  echo "[$grid] exit $rc after $(( $(date +%s) - START ))s"
  return "$rc"
}

status=0
for group in $GRIDS; do
  IFS=+ read -r -a members <<<"$group"
  n=${#members[@]}
  # Every process of the group gets an equal share of the accelerator's memory.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  export XLA_PYTHON_CLIENT_MEM_FRACTION
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v n="$n" -v w="$W" 'BEGIN{printf "%.3f", 0.9/(n*w)}')
  pids=()
  for grid in "${members[@]}"; do
    run_grid "$grid" "$W" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  copy_out
done
exit "$status"
