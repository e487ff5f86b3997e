#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k serve   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Chromium for the browser tests, Debian's genuine Fashion-MNIST files.
if ! command -v chromium >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium dataset-fashion-mnist
fi

python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null

# The genuine MNIST files sit beside the checkout; tests never download.
export DIGITLAB_DATA_DIR="${DIGITLAB_DATA_DIR:-$(cd ../shared/data/mnist && pwd)}"
exec .venv/bin/python -m pytest "$@"
