#!/bin/sh
# Draw the README pictures in docs/ with digitlab's own commands.
#
#   docs/make_pictures.sh [MODEL]      MODEL defaults to the bundled model
#
# Needs MNIST where digitlab finds it (e.g. DIGITLAB_DATA_DIR=/path/to/mnist) and
# digitlab installed in the Python that $PYTHON names (default: python).
set -eu
cd "$(dirname "$0")/.."
MODEL=${1:-src/digitlab/weights/digitlab-best.safetensors}
DPI=90
digitlab() { "${PYTHON:-python}" -m digitlab "$@"; }

digitlab show heatmap --index 5 --dpi "$DPI" -o docs/heatmap.png
digitlab show grid --split train --start 0 --count 8 --dpi "$DPI" -o docs/grid.png
digitlab show predictions "$MODEL" --count 25 --dpi "$DPI" -o docs/predictions.png
digitlab show confusion "$MODEL" --dpi "$DPI" -o docs/confusion.png
digitlab show mistakes "$MODEL" --count 15 --dpi "$DPI" -o docs/mistakes.png
digitlab show history "$MODEL" --dpi "$DPI" -o docs/history.png
digitlab show filters "$MODEL" --dpi "$DPI" -o docs/filters.png
digitlab show activations "$MODEL" --index 0 --dpi "$DPI" -o docs/activations.png
