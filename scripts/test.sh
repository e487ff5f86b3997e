#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest (here: the quick part)
# MNIST comes from $DIGITLAB_DATA_DIR, else where `digitlab train` keeps it (~/.cache/digitlab/mnist),
# else it is downloaded there (checksums verified). Offline with no copy, it stops with one line.
set -euo pipefail
cd "$(dirname "$0")/.."

# The virtual environment; reinstalled only when pyproject.toml changes, so later runs work offline.
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.digitlab-test-install"
if ! cmp -s pyproject.toml "$stamp"; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
    cp pyproject.toml "$stamp"
fi

# MNIST, before anything slow: one line and exit status 2 when there is none and no network.
data_dir=$(.venv/bin/python - <<'PY'
import sys

from digitlab.data import locate_dataset
from digitlab.errors import DigitlabError

try:
    print(locate_dataset(progress=False))
except DigitlabError as error:
    sys.exit(f"scripts/test.sh: no MNIST for the tests: {error}")
PY
) || exit 2
export DIGITLAB_DATA_DIR="$data_dir"

# System packages, where apt exists: Chromium for the browser tests, Debian's Fashion-MNIST.
# Without them those tests skip, naming the package (DIGITLAB_REQUIRE_ALL=1 makes that a failure).
if command -v apt-get >/dev/null && { ! command -v chromium >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ]; }; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then sudo="sudo"; else sudo="missing"; fi
    fi
    if [ "$sudo" = missing ]; then
        echo "scripts/test.sh: not root and no sudo: chromium and dataset-fashion-mnist not installed" >&2
    else
        $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium dataset-fashion-mnist \
            || echo "scripts/test.sh: apt-get failed: chromium and dataset-fashion-mnist not installed" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
