#!/usr/bin/env bash
# Create .venv and install everything UnSAM needs. Safe to re-run: each step is skipped when
# what it installs is already importable. Usage: scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${1:-.venv}")
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools<81"
fi
VPY="$VENV/bin/python"
PIP="$VPY -m pip install -q"

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1"
    $PIP torch==2.14.1 torchvision==0.29.1
fi

echo "[setup] installing runtime + test requirements"
$PIP -r requirements.txt -r requirements-dev.txt

if ! "$VPY" -W ignore -c "import unsam.compat, detectron2.engine" 2>/dev/null; then
    # No official wheel exists: pb1-detectron2 is detectron2 v0.6 as an sdist without its C++
    # sources, so drop the extension list and the black pin before building it.
    echo "[setup] installing detectron2 0.6 (pb1-detectron2 sdist, no C++ extension)"
    tmp=$(mktemp -d)
    sdist=$("$VPY" scripts/fetch_sdist.py pb1-detectron2 0.6 "$tmp")
    tar -xzf "$sdist" -C "$tmp"
    src=$(find "$tmp" -maxdepth 1 -mindepth 1 -type d | head -n1)
    "$VPY" - "$src/setup.py" <<'PYEOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = re.sub(r"ext_modules\s*=\s*get_extensions\(\)", "ext_modules=[]", text)
text = re.sub(r"\s*\"black[^\"]*\",", "", text)
open(path, "w").write(text)
PYEOF
    $PIP --no-build-isolation "$src"
    rm -rf "$tmp"
fi

# The browser test (tests/test_app.py) drives Debian's chromium through chromium-driver and skips
# without them. As root with apt (CI, containers) they are installed here; elsewhere: a hint.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing chromium + chromium-driver (Debian) for the browser test"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "[setup] note: no chromium/chromedriver: the browser test will skip (sudo apt-get install chromium chromium-driver)"
    fi
fi

# checked from / so that the repository folder itself does not satisfy the import
if ! (cd / && "$VPY" -c "import unsam" 2>/dev/null); then
    echo "[setup] installing unsam (editable)"
    $PIP --no-deps --no-build-isolation -e .
fi
# compiled CPU kernels for inference (deformable attention, mask binarization); without a C++
# compiler this prints a note and everything runs on the slower pure-PyTorch paths
(cd / && "$VPY" -W ignore -m unsam.ops)
(cd / && "$VPY" -W ignore -c "import unsam, detectron2.engine; print('[setup] ok: unsam', unsam.__version__, 'with detectron2', detectron2.__version__)")
