#!/usr/bin/env bash
# Scale-out checks: the PostgreSQL keystore (every `postgres` test, the slow two-server and
# database-crash ones included) and the Ray Serve deployment against a real local Ray.
# Installs what it needs: Debian's postgresql (for initdb and pg_ctl) and the `ray` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v initdb > /dev/null && ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql > /dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq postgresql > /dev/null; fi
fi
.venv/bin/pip install -q -e ".[dev,ray]"
# -m overrides the default "not slow": every postgres test, slow or not (but the 500-kill crash run,
# 10 minutes here; the 20-kill run covers the database), then the Ray Serve tests.
timeout 1800 .venv/bin/python -m pytest -q -m postgres -k "not killed_500_times"
timeout 900 .venv/bin/python -m pytest -q -m '' tests/test_ray_serve.py
echo "CI: scale-out checks passed"
