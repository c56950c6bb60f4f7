#!/usr/bin/env bash
# Issue 14's final tables on one lent accelerator: every method x objective x IPC 1/10/50 x seeds
# 0-2 on Fashion-MNIST and cifar10-dev (ConvNet-D3, the configs' defaults), then the cifar10-dev
# grid with a ResNet-18 (CIFAR stem) teacher and student. bench/accuracy.py runs WORKERS cells at
# once in separate processes sharing the device (each capped at 0.9/WORKERS of its memory) and
# resumes a killed grid from its finished cells, so a second call finishes what a first one left.
#
#     bash bench/accuracy_gpu.sh                      # all three grids
#     WORKERS=4 bash bench/accuracy_gpu.sh fashion_mnist
#
# Writes bench/results/accuracy_fashion_mnist.json, accuracy_cifar10_dev.json and
# accuracy_cifar10_dev_resnet18.json (+ .md). Prepared on a CPU session: the per-cell times on one
# H200 (bench/results/fashion_mnist_gpu.json: 15-25 s per run after a 20 s teacher) put 54 cells
# per dataset at ~2-3 min with 8 workers; not yet timed on a device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${WORKERS:-8}
GRIDS=${*:-fashion_mnist cifar10_dev resnet18}
for grid in $GRIDS; do
  case $grid in
    fashion_mnist|cifar10_dev)
      $PY -m bench.accuracy --config "experiments/configs/$grid.py" --workers "$W" ;;
    resnet18)
      $PY -m bench.accuracy --config experiments/configs/cifar10_dev.py:resnet18 --workers "$W" \
        --out bench/runs/accuracy/cifar10_dev_resnet18 \
        --results bench/results/accuracy_cifar10_dev_resnet18.json ;;
    *) echo "unknown grid $grid (fashion_mnist | cifar10_dev | resnet18)" >&2; exit 2 ;;
  esac
done
