#!/usr/bin/env bash
# Sets up robustlab on a fresh machine: the CPU build of torch first (so pip never pulls a CUDA build),
# Debian's Fashion-MNIST package and clang (tinygrad's CPU compiler) where apt is available, then robustlab
# with its test and tinygrad extras.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
if { [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v clang >/dev/null; } \
        && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist clang >/dev/null
fi
python3 -m pip install -q -e ".[test,tinygrad]"
