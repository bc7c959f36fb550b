#!/usr/bin/env bash
# Rehearse the Docker image without a Docker engine: the Dockerfile's install commands in a fresh
# virtualenv (the CPU torch wheel instead of the CUDA one), then its smoke test: start app.py the
# way the image does (LDM_* environment variables, auth on), run the image's HEALTHCHECK command,
# fetch /, stop the app.
#
#   .ci/docker_rehearsal.sh            # PYTHON=python3.12 to pick the interpreter
#   KEEP=1 .ci/docker_rehearsal.sh     # keep the temp folder (venv, logs) for a look
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ldm-docker-rehearsal.XXXXXX")
APP_PID=""

cleanup() {
    if [ -n "$APP_PID" ] && kill -0 "$APP_PID" 2>/dev/null; then
        kill "$APP_PID" 2>/dev/null || true
        wait "$APP_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = "1" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

# The values the image is built with, read from the Dockerfile itself so the two cannot drift.
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/Dockerfile")
HEALTHCHECK=$(sed -n '/^HEALTHCHECK/,/^$/p' "$ROOT/Dockerfile" | sed -n 's/^ *CMD //p')
[ -n "$TORCH_VERSION" ] && [ -n "$HEALTHCHECK" ] || { echo "cannot read TORCH_VERSION/HEALTHCHECK from the Dockerfile"; exit 1; }

step "fresh virtualenv ($("$PYTHON" --version))"
"$PYTHON" -m venv "$WORK/venv"
export VIRTUAL_ENV="$WORK/venv" PATH="$WORK/venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
hash -r

step "install, as the Dockerfile does (torch $TORCH_VERSION: CPU wheel here, cu128 in the image)"
pip install --quiet "torch==${TORCH_VERSION}"
pip install --quiet -r "$ROOT/requirements.txt"
pip check
python -c "import torch, diffusers, transformers, gradio; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| gradio', gradio.__version__)"

step "model for the smoke test"
if [ -f "$ROOT/weights/demo/model_index.json" ]; then
    MODEL="$ROOT/weights/demo"
else
    MODEL="$WORK/tiny-model"
    (cd "$ROOT/tests" && python -c "import sys, tiny; tiny.save_model(__import__('pathlib').Path(sys.argv[1]))" "$MODEL") >/dev/null
fi
echo "$MODEL"

step "start app.py as the image does (env vars, auth on)"
PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# The image listens on 0.0.0.0; the rehearsal stays on loopback.
(cd "$WORK" && OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HOME="$WORK/hf" LDM_HOST=127.0.0.1 LDM_PORT="$PORT" \
    LDM_OUTPUTS="$WORK/outputs" LDM_AUTH=ci:rehearsal LDM_MODEL="$MODEL" \
    exec python "$ROOT/app.py" >"$WORK/app.log" 2>&1) &
APP_PID=$!

step "poll with the image's HEALTHCHECK command"
export LDM_PORT="$PORT"
for _ in $(seq 1 180); do
    if ! kill -0 "$APP_PID" 2>/dev/null; then echo "app.py exited:"; cat "$WORK/app.log"; exit 1; fi
    if eval "$HEALTHCHECK" 2>/dev/null; then break; fi
    sleep 1
done
eval "$HEALTHCHECK" || { echo "no healthy answer in 180 s:"; tail -50 "$WORK/app.log"; exit 1; }
echo "healthy on port $PORT"

step "fetch / and the API description"
python - "$PORT" <<'PY'
import sys, urllib.request, urllib.error
from gradio_client import Client

url = f"http://127.0.0.1:{sys.argv[1]}/"
try:
    with urllib.request.urlopen(url, timeout=10) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as exc:  # behind auth a page may answer 401: still alive
    status, body = exc.code, b""
print("GET /", status, len(body), "bytes")
assert status < 500
api = Client(url, auth=("ci", "rehearsal"), verbose=False).view_api(print_info=False, return_format="dict")
endpoints = sorted(api["named_endpoints"])
print("endpoints:", " ".join(endpoints))
assert {"/txt2img", "/img2img", "/inpaint", "/upscale", "/png_info"} <= set(endpoints)
PY

step "stop"
kill "$APP_PID"
wait "$APP_PID" 2>/dev/null || true
APP_PID=""
echo "docker rehearsal passed"
