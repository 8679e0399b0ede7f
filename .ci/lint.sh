#!/usr/bin/env bash
# Lint: ruff over the whole tree, mypy on the SDK (seglock.client, strict) and the keystore.
# Configuration: [tool.ruff] and [tool.mypy] in pyproject.toml. Usage: bash .ci/lint.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"

"$py" -m ruff check .

# mypy resolves `seglock.client` through a tree of links to the repository's folders (the
# package-dir mapping of the install is invisible to it), kept under .mypy_cache so that its cache
# stays valid between runs; paths in its messages are the repository's.
src=.mypy_cache/src
mkdir -p "$src/seglock"
for part in app client keystore models; do ln -sfn "$PWD/$part" "$src/seglock/$part"; done
MYPYPATH="$src" "$py" -m mypy -p seglock.client -p seglock.keystore 2>&1 | sed "s|$src/seglock/||g"
