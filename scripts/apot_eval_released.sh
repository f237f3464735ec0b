#!/usr/bin/env bash
# Evaluate the APoT authors' released CIFAR-10 ResNet-20 checkpoints with our APoT model (docs/apot.md).
# Usage: scripts/apot_eval_released.sh RELEASE_DIR [CIFAR10_ROOT]  (the folder of the authors' res20_*bit.pth.tar)   (one process at a time; CPU is fine)
set -euo pipefail
release=${1:?pass the folder holding the released res20_*bit.pth.tar checkpoints}
root=${2:-${QREPRO_CIFAR10:?pass the CIFAR-10 root as the second argument or set QREPRO_CIFAR10}}
for pair in w4a4:4 w3a3:3 w2a2:2 fp:32; do
  exp=${pair%%:*}; bits=${pair##*:}
  echo "== apot_resnet20_cifar10_${exp} <- res20_${bits}bit.pth.tar"
  python -m qrepro.evaluate +experiment="apot_resnet20_cifar10_${exp}" \
    init_from="${release}/res20_${bits}bit.pth.tar" dataset.root="${root}" logger=none
done
