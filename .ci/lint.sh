#!/usr/bin/env bash
# Lint: ruff over the whole tree, mypy (strict) on the SDK (seglock.client) and the keystore, and
# `bash -n` over the shell scripts (benchmarks/gpu.sh runs only where a GPU is, never in CI); all
# always run, and the script fails if any finds something.
# Configuration: [tool.ruff] and [tool.mypy] in pyproject.toml. Usage: bash .ci/lint.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"

status=0
"$py" -m ruff check . || status=1

# mypy resolves `seglock.client` through a tree of links to the repository's folders (the
# package-dir mapping of the install is invisible to it), kept under .mypy_cache so that its cache
# stays valid between runs; paths in its messages are the repository's.
src=.mypy_cache/src
mkdir -p "$src/seglock"
for part in app client keystore models; do ln -sfn "$PWD/$part" "$src/seglock/$part"; done
MYPYPATH="$src" "$py" -m mypy -p seglock.client -p seglock.keystore 2>&1 | sed "s|$src/seglock/||g" || status=1
for script in .ci/run .ci/*.sh benchmarks/*.sh deploy/*.sh; do
    bash -n "$script" || status=1
done
exit $status
