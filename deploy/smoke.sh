#!/usr/bin/env bash
# The Docker deployment, end to end and for real: build the image, start docker-compose.yml, wait
# for healthy, read the initial tokens from the home volume, segment a synthetic scene, rotate the
# demo CP model's key with the admin token and check the mask is unchanged, check the server runs
# as non-root with no capabilities, a read-only root, a 0600 keystore and no master.key, restart
# and check again, run the `replicas` profile behind nginx, then stop and remove everything.
# Exits non-zero on the first failure. Not part of .ci/run: it takes minutes and a Docker engine.
#
#   deploy/smoke.sh 2>&1 | tee /tmp/smoke-output.txt
#
# Needs: docker (engine running), `docker compose` or docker-compose >= 1.28, curl, python3.
# What it does where images or PyPI cannot be reached is decided here, never in the Dockerfile:
#   SMOKE_BASE_IMAGE  BASE_IMAGE of the build. Default: python:3.11-slim if it is here or can be
#                     pulled, else seglock-base:bookworm, made with debootstrap when missing (root).
#   SMOKE_WHEELS      a folder to `pip download` every dependency into on the host and serve to the
#                     build on 127.0.0.1 (`--network host`, PIP_NO_INDEX=1, PIP_FIND_LINKS). Default:
#                     .wheels when a container cannot reach PyPI, else none (the build uses PyPI).
#                     "none" forces a plain build. The host's python3 must be 3.11 to fill it.
#   SMOKE_PIP_PINS    extra pins for that download, e.g. "torch==2.14.1 torchvision==0.29.1"
#   SMOKE_WHEEL_PORT  port of that wheel server on 127.0.0.1 (default 38765, else any free one)
#   TORCH_INDEX_URL   passed to the build (e.g. https://download.pytorch.org/whl/cpu)
#   SMOKE_REPLICAS    1 (default): also run the replicas profile; 0 skips it
#   SMOKE_NGINX_IMAGE nginx image for it. Default nginx:1.27 if here or pullable, else one built
#                     from the base image with Debian's nginx
#   SMOKE_TIMEOUT     seconds to wait for a server to become healthy (default 900)
#   SMOKE_KEEP_IMAGE  1 keeps the built images afterwards (default 0: removed)

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PROJECT=seglock-smoke
IMAGE=seglock:smoke
MODEL=demo-cp  # demo-plain with a channel permutation: the two masks must agree
TIMEOUT=${SMOKE_TIMEOUT:-900}
REPLICAS=${SMOKE_REPLICAS:-1}
KEEP_IMAGE=${SMOKE_KEEP_IMAGE:-0}
WORK=$(mktemp -d /tmp/seglock-smoke.XXXXXX)
START=$(date +%s)
WHEEL_SERVER_PID=""
BUILT_NGINX=""
COMPOSE_STARTED=0

log() { printf '[smoke %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
pass() { log "ok: $*"; }

# -- tools ----------------------------------------------------------------------------------------
for tool in docker curl python3; do
    command -v "$tool" > /dev/null || fail "$tool is not installed"
done
docker info > /dev/null 2>&1 || fail "no Docker engine answers (start dockerd)"
if docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose > /dev/null; then
    COMPOSE=(docker-compose)
else
    fail "neither 'docker compose' nor docker-compose is installed"
fi
log "engine $(docker version -f '{{.Server.Version}}'), compose: $("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
PROXY_PORT=$(free_port)

export COMPOSE_PROJECT_NAME=$PROJECT
export SEGLOCK_IMAGE=$IMAGE
export SEGLOCK_BIND=127.0.0.1
export SEGLOCK_PUBLISH=$PORT
export SEGLOCK_PROXY_PUBLISH=$PROXY_PORT
export SEGLOCK_MASTER_KEY_SECRET_FILE=$WORK/secrets/master.key
compose() { "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" --profile replicas "$@"; }

cleanup() {
    local status=$?
    trap - EXIT
    set +e
    if [ "$COMPOSE_STARTED" = 1 ]; then
        if [ "$status" != 0 ]; then
            log "server logs (last 60 lines) after the failure:"
            compose logs --no-color --tail=60 2>&1 | sed 's/^/    /'
        fi
        log "teardown: compose down --volumes"
        compose down --volumes --remove-orphans > "$WORK/down.log" 2>&1 || { cat "$WORK/down.log"; status=1; }
        log "teardown: $(grep -c '^Removing' "$WORK/down.log") containers, networks and volumes removed"
        if docker volume ls -q | grep -q "^${PROJECT}_"; then
            log "FAIL: volumes of $PROJECT are left"; status=1
        fi
        if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]; then
            log "FAIL: containers of $PROJECT are left"; status=1
        fi
    fi
    [ -n "$WHEEL_SERVER_PID" ] && kill "$WHEEL_SERVER_PID" 2> /dev/null
    if [ "$KEEP_IMAGE" != 1 ]; then
        docker rmi "$IMAGE" > /dev/null 2>&1
        [ -n "$BUILT_NGINX" ] && docker rmi "$BUILT_NGINX" > /dev/null 2>&1
    fi
    chmod -R u+w "$WORK" 2> /dev/null; rm -rf "$WORK"
    if [ "$status" = 0 ]; then log "PASSED"; else log "FAILED (exit $status)"; fi
    exit "$status"
}
trap cleanup EXIT

image_available() {  # here, or pullable
    docker image inspect "$1" > /dev/null 2>&1 || docker pull -q "$1" > /dev/null 2>&1
}

# -- base image -----------------------------------------------------------------------------------
make_bookworm_base() {  # a minimal Debian bookworm (Python 3.11) as a local image
    command -v debootstrap > /dev/null || fail "no python:3.11-slim and no debootstrap to make a base image"
    [ "$(id -u)" = 0 ] || fail "debootstrap needs root"
    local rootfs=$WORK/rootfs
    log "base: debootstrap bookworm into $rootfs (a few minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    tar -C "$rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
        --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' -c . \
        | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - seglock-base:bookworm > /dev/null
    rm -rf "$rootfs"
}

if [ -n "${SMOKE_BASE_IMAGE:-}" ]; then
    BASE=$SMOKE_BASE_IMAGE
elif image_available python:3.11-slim; then
    BASE=python:3.11-slim
else
    BASE=seglock-base:bookworm
fi
if [ "$BASE" = seglock-base:bookworm ] && ! docker image inspect "$BASE" > /dev/null 2>&1; then
    make_bookworm_base
fi
docker image inspect "$BASE" > /dev/null 2>&1 || fail "base image $BASE is not available"
log "base image: $BASE ($(docker run --rm --entrypoint python3 "$BASE" --version))"

# -- where the build takes Python packages from ---------------------------------------------------
WHEELS=${SMOKE_WHEELS:-}
if [ -z "$WHEELS" ]; then
    if docker run --rm --network host --entrypoint python3 "$BASE" -c \
        'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10)' > /dev/null 2>&1; then
        WHEELS=none
    else
        WHEELS=.wheels
        log "a container cannot reach PyPI here: the build installs from wheels served from the host"
    fi
fi
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
if [ "$WHEELS" != none ]; then
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || fail "the host's python3 is not 3.11: it cannot download wheels for the image"
    mkdir -p "$WHEELS"
    python3 - > "$WORK/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
EOF
    # shellcheck disable=SC2086  # SMOKE_PIP_PINS is a list of requirements
    python3 -m pip download -q --dest "$WHEELS" -r "$WORK/requirements.txt" ${SMOKE_PIP_PINS:-} \
        > "$WORK/pip-download.log" 2>&1 || { tail -20 "$WORK/pip-download.log"; fail "pip download failed"; }
    log "wheels: $(find "$WHEELS" -maxdepth 1 -type f | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS" \
        "($(find "$WHEELS" -maxdepth 1 \( -name 'torch-*.whl' -o -name 'torchvision-*.whl' \) -printf '%f '))"
    # A fixed port keeps the build's pip layers cacheable (the URL is part of their cache key).
    WHEEL_PORT=${SMOKE_WHEEL_PORT:-38765}
    if ! python3 -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$WHEEL_PORT" 2> /dev/null; then
        WHEEL_PORT=$(free_port)
    fi
    python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELS" > "$WORK/wheel-server.log" 2>&1 &
    WHEEL_SERVER_PID=$!
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$WHEEL_PORT/" > /dev/null && break; sleep 0.1; done
    BUILD_ARGS+=(--network host --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/")
fi

# -- build ----------------------------------------------------------------------------------------
[ -f models/zoo/__init__.py ] || fail "models/zoo is missing: the image would have no demo models"
log "build: docker build ${BUILD_ARGS[*]} -t $IMAGE ."
docker build "${BUILD_ARGS[@]}" -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "docker build failed"; }
[ -n "$WHEEL_SERVER_PID" ] && { kill "$WHEEL_SERVER_PID"; WHEEL_SERVER_PID=""; }
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
pass "built $IMAGE: $(( SIZE / 1000000 )) MB, user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | grep -q healthz \
    || fail "the image has no HEALTHCHECK on /healthz"

# -- compose up -----------------------------------------------------------------------------------
mkdir -m 0700 "$WORK/secrets"
python3 -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())' \
    > "$SEGLOCK_MASTER_KEY_SECRET_FILE"
chmod 0444 "$SEGLOCK_MASTER_KEY_SECRET_FILE"  # readable by uid 10001 inside; the 0700 folder guards it here
compose config -q || fail "compose rejects docker-compose.yml"
COMPOSE_STARTED=1
log "compose up seglock (port $PORT)"
compose up -d --no-build seglock > "$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "compose up failed"; }

wait_healthy() {  # wait_healthy SERVICE: every container of it healthy
    local service=$1 deadline=$(( $(date +%s) + TIMEOUT )) ids id state healthy
    while :; do
        ids=$(compose ps -q "$service")
        [ -n "$ids" ] || fail "$service has no container"
        healthy=1
        for id in $ids; do
            state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
            case $state in
                "running healthy") ;;
                "running starting") healthy=0 ;;
                *) fail "$service container ${id:0:12} is '$state'" ;;
            esac
        done
        [ "$healthy" = 1 ] && return 0
        [ "$(date +%s)" -lt "$deadline" ] || fail "$service not healthy after ${TIMEOUT}s"
        sleep 3
    done
}
wait_healthy seglock
pass "seglock is healthy"

BASE_URL=http://127.0.0.1:$PORT
curl -fsS "$BASE_URL/healthz" > /dev/null || fail "/healthz does not answer on the published port"
curl -fsS "$BASE_URL/readyz" > "$WORK/ready.json" || fail "/readyz is not 200"
pass "/readyz: $(cat "$WORK/ready.json")"

in_server() { compose exec -T seglock "$@"; }

# -- tokens from the volume -----------------------------------------------------------------------
in_server cat /var/lib/seglock/initial-tokens.json > "$WORK/tokens.json" || fail "no initial-tokens.json in the home volume"
json_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
ADMIN=$(json_field "$WORK/tokens.json" admin)
CLIENT=$(json_field "$WORK/tokens.json" client)
case $CLIENT in slk_*) ;; *) fail "the client token does not look like slk_…" ;; esac
pass "read the initial admin and client tokens from the home volume"

# -- segment ----------------------------------------------------------------------------------------
in_server python -c '
import io, sys
from PIL import Image
from seglock.models.data.synth import generate_scene
image, _ = generate_scene(seed=7, index=0, size=128)
buffer = io.BytesIO()
Image.fromarray(image).save(buffer, format="PNG")
sys.stdout.buffer.write(buffer.getvalue())
' > "$WORK/scene.png" || fail "could not make a synthetic scene in the container"
head -c 8 "$WORK/scene.png" | od -An -c | grep -q 'P   N   G' || fail "the synthetic scene is not a PNG"

# request OUT TOKEN URL [curl args...] -> prints the HTTP status
request() {
    local out=$1 token=$2 url=$3
    shift 3
    curl -sS -o "$out" -w '%{http_code}' -H "Authorization: Bearer $token" "$@" "$url"
}
segment() {  # segment OUT [BASE] -> the mask PNG of the scene from $MODEL
    local code
    code=$(request "$1" "$CLIENT" "${2:-$BASE_URL}/v1/models/$MODEL/segment" -F "image=@$WORK/scene.png;type=image/png")
    [ "$code" = 200 ] || fail "segment $MODEL answered $code: $(head -c 300 "$1")"
    head -c 8 "$1" | od -An -c | grep -q 'P   N   G' || fail "segment $MODEL did not answer a PNG"
}
digest() { sha256sum "$1" | cut -c1-16; }

code=$(request "$WORK/models.json" "$CLIENT" "$BASE_URL/v1/models")
[ "$code" = 200 ] || fail "GET /v1/models answered $code"
pass "the client token may use: $(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); d = d.get("models", d) if isinstance(d, dict) else d; print(", ".join(m["name"] if isinstance(m, dict) else str(m) for m in d))' "$WORK/models.json")"

segment "$WORK/mask-before.png"
pass "segmented a 128x128 synthetic scene with $MODEL: mask $(digest "$WORK/mask-before.png")"

# The served key must be the right one: the mask matches the scene's truth, and (demo-cp being
# demo-plain with a channel permutation) agrees with demo-plain's mask.
code=$(request "$WORK/mask-plain.png" "$CLIENT" "$BASE_URL/v1/models/demo-plain/segment" -F "image=@$WORK/scene.png;type=image/png")
[ "$code" = 200 ] || fail "segment demo-plain answered $code"
in_server python -c '
import base64, io, sys
import numpy as np
from PIL import Image
from seglock.models.data.synth import generate_scene
_, truth = generate_scene(seed=7, index=0, size=128)
cp, plain = (np.asarray(Image.open(io.BytesIO(base64.b64decode(a)))) for a in sys.argv[1:3])
accuracy, agreement = float((cp == truth).mean()), float((cp == plain).mean())
print(f"pixel accuracy {accuracy:.3f} against the scene truth, {agreement:.4f} agreement with demo-plain, "
      f"classes {sorted(set(np.unique(cp).tolist()))}")
sys.exit(0 if accuracy >= 0.7 and agreement >= 0.99 else 1)
' "$(base64 -w0 "$WORK/mask-before.png")" "$(base64 -w0 "$WORK/mask-plain.png")" > "$WORK/quality.txt" \
    || fail "the $MODEL mask is not a segmentation of the scene: $(cat "$WORK/quality.txt")"
pass "$MODEL: $(cat "$WORK/quality.txt")"

code=$(request /dev/null "" "$BASE_URL/v1/models/$MODEL/segment" -F "image=@$WORK/scene.png")
[ "$code" = 401 ] || fail "a request without a token answered $code, not 401"
code=$(request /dev/null "$CLIENT" "$BASE_URL/admin/models/$MODEL/rotate-key" -X POST)
[ "$code" = 403 ] || fail "the client token on an admin route answered $code, not 403"
pass "no token: 401; client token on /admin: 403"

# -- rotate -----------------------------------------------------------------------------------------
rotate() {  # rotate [BASE] -> checks the key version moved up by one
    local code
    code=$(request "$WORK/rotation.json" "$ADMIN" "${1:-$BASE_URL}/admin/models/$MODEL/rotate-key" -X POST)
    [ "$code" = 200 ] || fail "rotate-key answered $code: $(head -c 300 "$WORK/rotation.json")"
    python3 - "$WORK/rotation.json" <<'EOF' || fail "rotate-key did not move the key version up by one"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["key_version"] == r["previous_key_version"] + 1, r
EOF
    pass "rotated $MODEL: $(cat "$WORK/rotation.json")"
}
rotate
segment "$WORK/mask-after.png"
cmp -s "$WORK/mask-before.png" "$WORK/mask-after.png" \
    || fail "the mask changed across the rotation ($(digest "$WORK/mask-before.png") -> $(digest "$WORK/mask-after.png"))"
pass "the mask after the rotation is bit-for-bit the same"

# -- hardening --------------------------------------------------------------------------------------
in_server python - > "$WORK/inside.txt" <<'EOF' || { cat "$WORK/inside.txt"; fail "a hardening check failed in the container"; }
import errno, os, stat
status = dict(line.split(":", 1) for line in open("/proc/1/status").read().splitlines() if ":" in line)
uids = status["Uid"].split()
cmdline = open("/proc/1/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
print(f"pid 1: {cmdline!r}, uids {' '.join(uids)}, CapEff {status['CapEff'].strip()}, "
      f"NoNewPrivs {status['NoNewPrivs'].strip()}")
assert "serve" in cmdline, "pid 1 is not the server"
assert all(u != "0" for u in uids), "the server runs as root"
assert int(status["CapEff"], 16) == 0, "the server has capabilities"
assert status["NoNewPrivs"].strip() == "1", "no-new-privileges is off"
home = "/var/lib/seglock"
modes = {name: stat.S_IMODE(os.stat(os.path.join(home, name)).st_mode)
         for name in ("", "keystore.json", "initial-tokens.json")}
print("modes:", {name or "home": oct(mode) for name, mode in modes.items()})
assert modes["keystore.json"] == 0o600, "keystore.json is not 0600"
assert modes["initial-tokens.json"] == 0o600, "initial-tokens.json is not 0600"
assert modes[""] & 0o077 == 0, "the home folder is open to others"
assert not os.path.exists(os.path.join(home, "master.key")), "a master.key was written to the volume"
print("master key from:", os.environ["SEGLOCK_MASTER_KEY_FILE"], "; no master.key in the home")
try:
    open("/opt/seglock/probe", "w")
except OSError as exc:
    assert exc.errno == errno.EROFS, exc
    print("root filesystem: read-only")
else:
    raise AssertionError("the root filesystem is writable")
EOF
sed 's/^/    /' "$WORK/inside.txt"
pass "non-root, no capabilities, no-new-privileges, read-only root, keystore 0600, no master.key"

# -- backup: the documented hot backup (tar under the keystore's and the audit log's locks) ---------
VOLUME=${PROJECT}_seglock-home
docker run --rm --entrypoint flock -v "$VOLUME:/var/lib/seglock" "$IMAGE" \
    /var/lib/seglock/keystore.json.lock flock /var/lib/seglock/keystore.audit.lock \
    tar -C /var/lib/seglock --exclude=./initial-tokens.json --exclude=./master.key -cf - . > "$WORK/backup.tar" \
    || fail "the hot backup of the home volume failed"
tar -tf "$WORK/backup.tar" > "$WORK/backup.list"
grep -qx './keystore.json' "$WORK/backup.list" || fail "the backup lacks keystore.json"
grep -q "^./models/$MODEL/" "$WORK/backup.list" || fail "the backup lacks models/$MODEL"
! grep -q 'master.key' "$WORK/backup.list" || fail "the backup holds a master key"
! grep -q 'initial-tokens.json' "$WORK/backup.list" || fail "the backup holds the initial tokens"
grep -q '^./keystore.audit-' "$WORK/backup.list" || fail "the backup lacks the audit log"
pass "hot backup under the keystore lock: $(wc -l < "$WORK/backup.list") entries, $(( $(stat -c %s "$WORK/backup.tar") / 1000000 )) MB, no master key"

# -- restart: the keystore reopens under the secret file, the rotated key holds ---------------------
log "compose restart seglock"
compose restart seglock > /dev/null 2>&1 || fail "compose restart failed"
sleep 2
wait_healthy seglock
segment "$WORK/mask-restarted.png"
cmp -s "$WORK/mask-before.png" "$WORK/mask-restarted.png" || fail "the mask changed across a restart"
pass "after a restart: healthy, same tokens, same mask"

# -- replicas behind nginx --------------------------------------------------------------------------
if [ "$REPLICAS" = 1 ]; then
    NGINX=${SMOKE_NGINX_IMAGE:-}
    if [ -z "$NGINX" ]; then
        if image_available nginx:1.27; then
            NGINX=nginx:1.27
        else
            NGINX=seglock-smoke-nginx:latest
            BUILT_NGINX=$NGINX
            log "no nginx image: building $NGINX from $BASE with Debian's nginx"
            printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends nginx && rm -rf /var/lib/apt/lists/*\n' "$BASE" \
                | docker build --network host -t "$NGINX" - > "$WORK/nginx-build.log" 2>&1 \
                || { tail -20 "$WORK/nginx-build.log"; fail "could not build an nginx image"; }
        fi
    fi
    export SEGLOCK_NGINX_IMAGE=$NGINX
    log "compose --profile replicas up (nginx $NGINX on port $PROXY_PORT)"
    compose up -d --no-build > "$WORK/up-replicas.log" 2>&1 || { cat "$WORK/up-replicas.log"; fail "compose up --profile replicas failed"; }
    wait_healthy seglock-replica
    REPLICA_COUNT=$(compose ps -q seglock-replica | wc -l)
    [ "$REPLICA_COUNT" -ge 2 ] || fail "$REPLICA_COUNT replica(s) running, not 2"
    PROXY=http://127.0.0.1:$PROXY_PORT
    for _ in $(seq 60); do curl -fs "$PROXY/healthz" > /dev/null && break; sleep 1; done
    curl -fsS "$PROXY/healthz" > /dev/null || fail "nginx does not answer on port $PROXY_PORT"
    pass "$REPLICA_COUNT replicas healthy behind nginx, sharing the home volume"
    for i in $(seq 9); do
        segment "$WORK/mask-proxy-$i.png" "$PROXY"
        cmp -s "$WORK/mask-before.png" "$WORK/mask-proxy-$i.png" || fail "request $i through nginx gave another mask"
    done
    rotate "$PROXY"
    for i in $(seq 9); do
        segment "$WORK/mask-proxy-rotated-$i.png" "$PROXY"
        cmp -s "$WORK/mask-before.png" "$WORK/mask-proxy-rotated-$i.png" \
            || fail "request $i after a rotation through nginx gave another mask"
    done
    UPSTREAMS=$(compose logs --no-color nginx 2>/dev/null | grep -o 'upstream=[0-9.:]*' | sort -u | wc -l)
    [ "$UPSTREAMS" -ge 2 ] || fail "nginx sent every request to one server ($UPSTREAMS upstream address seen)"
    pass "18 segmentations through nginx over $UPSTREAMS servers, a rotation on one followed by all: same mask"
fi

log "all checks passed; tearing down"
