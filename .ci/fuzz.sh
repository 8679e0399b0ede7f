#!/usr/bin/env bash
# The fuzzer: schemathesis (pinned in the `dev` extra) against a live `seglock serve` on a fresh
# home with real tokens, over the whole OpenAPI schema (the bearer scheme is declared there, so
# the ignored_auth check runs). Any 5xx, schema violation or auth bypass fails CI. The operations
# whose schema-valid requests may still be refused for their content are listed, with why, in
# .ci/schemathesis.toml.
#   .ci/fuzz.sh [EXAMPLES_PER_OPERATION]     (default 25; a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ST=${ST:-$(dirname "$PY")/st}
EXAMPLES=${1:-${FUZZ_EXAMPLES:-25}}
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SEGLOCK_MASTER_KEY=$("$PY" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
export SEGLOCK_MASTER_KEY OMP_NUM_THREADS=1
"$PY" -m seglock.app.cli serve --home "$work/home" --host 127.0.0.1 --port "$port" --device cpu \
    > "$work/server.log" 2>&1 &
server=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
    if "$PY" -c "import httpx, sys; sys.exit(httpx.get('$base/readyz', timeout=2).status_code != 200)" 2>/dev/null; then
        break
    fi
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; echo "fuzz: the server did not start" >&2; exit 1; }
    sleep 1
done
admin=$("$PY" -c "import json; print(json.load(open('$work/home/initial-tokens.json'))['admin'])")

status=0
"$ST" --config-file .ci/schemathesis.toml run "$base/openapi.json" -H "Authorization: Bearer $admin" --checks all \
    --max-examples "$EXAMPLES" --workers 1 --request-timeout 30 --seed 13 \
    --suppress-health-check all --warnings off --no-color || status=$?
if grep -q -E "Traceback|Exception in ASGI" "$work/server.log"; then
    grep -v -E '"(GET|POST|DELETE|PUT|PATCH|HEAD|OPTIONS) ' "$work/server.log" | tail -n 120 >&2
    echo "fuzz: the server logged an unhandled exception" >&2
    status=1
fi
exit "$status"
