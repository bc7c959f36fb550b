#!/usr/bin/env bash
# Build the real image from the Dockerfile and run it, as users do (CPU variant: no GPU here).
#
# No registry is reachable, so the base is a Debian bookworm made with debootstrap and imported;
# the Dockerfile's BASE_IMAGE/TORCH_* build arguments swap the CUDA base and wheel index for it and
# for the CPU torch wheel on this machine's disk (served over loopback to the --network host build).
# This machine's TLS CA reaches pip as a BuildKit secret: used during the build, stored in no layer.
#
# Checks: HEALTHCHECK reports healthy; one image through gradio_client on the published port (auth
# on); the process runs as the non-root user; outputs land in the mounted volume owned by that user;
# the container runs --read-only with only the documented volumes and a /tmp tmpfs writable;
# `docker stop` ends it within 10 s. Everything it made (container, images, dockerd if it started
# it) is removed at the end.
#
#   .ci/docker_ci.sh                 # PYTHON=... for the interpreter with gradio_client (default .venv/bin/python)
#   KEEP=1 .ci/docker_ci.sh          # keep the work folder (base tree, logs)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DOCKER=/usr/bin/docker  # Debian's docker.io client: its built-in BuildKit takes --secret without buildx
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ldm-docker-ci.XXXXXX")
TAG="ldm-ci-$$"
BASE="ldm-ci-base:$$"
CONTAINER="ldm-ci-$$"
DOCKERD_PID=""
SERVER_PID=""

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

cleanup() {
    set +e
    if [ -x "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; then
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
        "$DOCKER" rmi -f "$TAG" "$BASE" >/dev/null 2>&1
        "$DOCKER" builder prune -af >/dev/null 2>&1
    fi
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null; wait "$DOCKERD_PID" 2>/dev/null; fi
    if [ "${KEEP:-0}" = "1" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

step "docker engine"
if ! command -v dockerd >/dev/null 2>&1 || [ ! -x "$DOCKER" ] || ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 "$WORK/dockerd.log"; exit 1; }
fi
"$DOCKER" version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

step "base image: debootstrap bookworm (minbase), docker import"
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
debootstrap --variant=minbase bookworm "$WORK/base" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
tar -C "$WORK/base" -c . | "$DOCKER" import - "$BASE" >/dev/null
rm -rf "$WORK/base"

step "serve the CPU torch wheel to the build"
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/Dockerfile")
WHEELS=$(pip config get global.find-links 2>/dev/null || true)
WHEEL=$(ls "${WHEELS:-/opt/wheels}"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)
[ -n "$WHEEL" ] || { echo "no CPU torch $TORCH_VERSION wheel in ${WHEELS:-/opt/wheels}"; exit 1; }
mkdir -p "$WORK/wheels" && ln "$WHEEL" "$WORK/wheels/" 2>/dev/null || cp "$WHEEL" "$WORK/wheels/"
WHEEL_PORT=$(free_port)
"$PYTHON" -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WORK/wheels" >"$WORK/wheels.log" 2>&1 &
SERVER_PID=$!
CA=$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)

step "docker build (CPU variant of the Dockerfile)"
started=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
    --secret id=pip_ca,src="$CA" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-arg TORCH_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
    -t "$TAG" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
kill "$SERVER_PID" 2>/dev/null; SERVER_PID=""
echo "built in $(( $(date +%s) - started )) s; image $(( $("$DOCKER" image inspect -f '{{.Size}}' "$TAG") / 1000000 )) MB"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" | cut -c1-110 | head -12
if "$DOCKER" run --rm --entrypoint sh "$TAG" -c '[ -s /run/secrets/pip_ca ]'; then
    echo "the CA bundle was stored in the image"; exit 1
fi

step "run: --read-only, tmpfs /tmp, the three volumes, auth on"
APP_UID=$(sed -n 's/^ARG APP_UID=//p' "$ROOT/Dockerfile")
mkdir -p "$WORK/outputs" "$WORK/hf" "$WORK/models"
chown "$APP_UID:$APP_UID" "$WORK/outputs" "$WORK/hf" "$WORK/models"
PORT=$(free_port)
"$DOCKER" run -d --name "$CONTAINER" --read-only --tmpfs /tmp \
    -v "$WORK/outputs:/outputs" -v "$WORK/hf:/cache/huggingface" -v "$WORK/models:/models" \
    -e LDM_AUTH=ci:container -e OMP_NUM_THREADS=1 -e HF_HUB_OFFLINE=1 \
    -p "127.0.0.1:$PORT:7860" "$TAG" >/dev/null

step "wait for the image's HEALTHCHECK"
status=starting
for _ in $(seq 1 120); do
    status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER" 2>/dev/null || echo gone)
    running=$("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null || echo false)
    [ "$status" = healthy ] && break
    [ "$running" = true ] || break
    sleep 3
done
echo "health: $status"
[ "$status" = healthy ] || { "$DOCKER" logs "$CONTAINER" 2>&1 | tail -40; exit 1; }

step "checks"
uid=$("$DOCKER" exec "$CONTAINER" id -u)
pid1=$("$DOCKER" exec "$CONTAINER" sh -c 'stat -c %u /proc/1')
echo "process uid $uid (pid 1 owned by $pid1)"
[ "$uid" = "$APP_UID" ] && [ "$pid1" = "$APP_UID" ] || { echo "the app does not run as uid $APP_UID"; exit 1; }
if "$DOCKER" exec "$CONTAINER" sh -c 'touch /app/x 2>/dev/null || touch /home/app/x 2>/dev/null'; then
    echo "the image's filesystem is writable despite --read-only"; exit 1
fi
"$PYTHON" - "$PORT" <<'PY'
import sys
from gradio_client import Client

client = Client(f"http://127.0.0.1:{sys.argv[1]}/", auth=("ci", "container"), verbose=False)
gallery, info, _, status = client.predict(prompt="a red circle on a blue background", steps=4, seed=1,
                                          api_name="/txt2img")
print("txt2img:", status.splitlines()[0], "|", info.splitlines()[-1][:80])
assert status.startswith("Done") and gallery, status
PY
ls -ln "$WORK/outputs" | sed -n '1,5p'
found=$(find "$WORK/outputs" -name '*.png' -user "$APP_UID" | wc -l)
[ "$found" -ge 1 ] || { echo "no PNG owned by uid $APP_UID in the outputs volume"; exit 1; }
echo "outputs volume: $found PNG(s) owned by uid $APP_UID"

step "docker stop ends it within 10 s"
started=$(date +%s.%N)
"$DOCKER" stop -t 10 "$CONTAINER" >/dev/null
elapsed=$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$started" "$(date +%s.%N)")
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
echo "stopped in ${elapsed} s, exit code $code"
"$PYTHON" -c "import sys; sys.exit(0 if float(sys.argv[1]) < 9.5 else 1)" "$elapsed" \
    || { echo "did not stop on its signal (killed at the timeout)"; exit 1; }
echo "docker CI passed"
