#!/usr/bin/env bash
# A separate virtual environment with the libraries metalearn's benchmarks measure against:
# learn2learn 0.2.0 and higher 0.2.1 (PyPI), on torch 2.14.1 + torchvision 0.29.1 (learn2learn
# imports torchvision). About 6 GB. For benchmarks only: never a dependency of metalearn, never
# in CI.
#   usage: benchmarks/make-peer-venv.sh DIR      then: DIR/bin/python -c 'import learn2learn, higher'
set -euo pipefail
dir=${1:?usage: benchmarks/make-peer-venv.sh DIR}
python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy pillow scipy requests gym tqdm cython
# learn2learn 0.2.0's sdist carries C files from an old Cython that no longer compile on Python
# 3.11: regenerate them from its .pyx sources, then build without build isolation.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --no-deps -d "$work" learn2learn==0.2.0
tar xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
src="$work/learn2learn-0.2.0"
rm -f "$src"/learn2learn/data/*.c
(cd "$src" && "$dir/bin/cython" -3 learn2learn/data/*.pyx)
"$py" -m pip install -q --no-deps --no-build-isolation "$src"
"$py" -m pip install -q --no-deps higher==0.2.1
"$py" -c 'import learn2learn, higher, torch; print("learn2learn", learn2learn.__version__, "torch", torch.__version__)'
