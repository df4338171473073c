#!/usr/bin/env bash
# Installs the peer libraries that scripts/bench_meta_step.py, scripts/bench_race.py and
# tests/core/test_bench_references.py compare tasklight with, into the active virtual environment
# Use a virtual environment of its own on top of the one tasklight is installed in, so that one
# stays as it is. `python -m venv --system-site-packages` only sees the *base* interpreter's
# packages, not another venv's, so the script links the two with a .pth file when BASE_VENV is set:
#
#   python -m venv /work/venv-bench && source /work/venv-bench/bin/activate
#   BASE_VENV=/work/venv bash scripts/install_peers.sh
#
#   learn2learn 0.2.0   no wheel for Python >= 3.11 and its sdist ships Cython output of 2020 that
#                       does not compile on 3.11: regenerate the C sources from the .pyx files with
#                       the Cython installed here, then build with --no-build-isolation. --no-deps:
#                       its declared deps (gym, torchvision, gsutil) would pull another torch; the
#                       benchmarks load learn2learn.algorithms.maml without the package __init__
#                       (which imports gym, torchvision and pytorch_lightning).
#   higher 0.2.1        plain pip (a tasklight runtime dependency already).
#   parallel-metalearn 0.5.6   plain pip, --no-deps (torch, numpy, tqdm are there); import name `metalearn`.
#   LibMTL 1.1.5        --no-deps (see pyproject.toml's bench extra).
set -euo pipefail
if [[ -n "${BASE_VENV:-}" ]]; then
    site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    base_site="$("$BASE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base_site" > "$site/_base_venv.pth"
fi
python -c "import torch" || { echo "torch is not importable here: install tasklight first (or set BASE_VENV)"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip install "cython>=3.0,<3.1" wheel setuptools
python -m pip install "higher==0.2.1"
python -m pip install --no-deps "parallel-metalearn==0.5.6" "LibMTL==1.1.5"
cd "$work"
python -m pip download --no-deps --no-binary learn2learn --no-build-isolation "learn2learn==0.2.0"
tar xzf learn2learn-0.2.0.tar.gz
cd learn2learn-0.2.0
rm -rf .eggs
for f in learn2learn/data/*.pyx; do
    python -m cython -3 "$f" -o "${f%.pyx}.c"
done
python -m pip install --no-deps --no-build-isolation .
cd /
python - <<'PY'
import importlib.util, metalearn.algorithms, higher
print("installed:", importlib.util.find_spec("learn2learn").origin, metalearn.algorithms.__name__, higher.__name__)
PY
