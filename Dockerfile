# GPU image for the web UI (app.py). Build:  docker build -t ldm-webui .
# Run:    docker run --gpus all -p 7860:7860 -e LDM_AUTH=me:secret \
#           -v $PWD/models:/models -v ldm-hf-cache:/cache/huggingface -v $PWD/outputs:/outputs ldm-webui
#         (add --read-only --tmpfs /tmp to keep the image itself unwritable: the three volumes and /tmp are all it writes)
# Optional xformers:  docker build --build-arg INSTALL_XFORMERS=1 -t ldm-webui .
# Optional Ray Serve backend (--backend ray, docs/scale-out.md):  docker build --build-arg WITH_RAY=1 -t ldm-webui .
# Behind a TLS-intercepting proxy, hand pip its CA bundle for the build only (never stored in a layer):
#         DOCKER_BUILDKIT=1 docker build --secret id=pip_ca,src=/path/to/ca-bundle.crt -t ldm-webui .
# CI builds a CPU variant from this same file (.ci/docker_ci.sh): BASE_IMAGE = a local Debian base,
# TORCH_INDEX_URL = PyPI and TORCH_FIND_LINKS = the CPU torch wheel served from the CI machine.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# torch comes from the PyTorch index of the base image's CUDA (12.8 -> cu128); its version must
# equal the torch pin in requirements.txt (tests/test_dockerfile.py checks both).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_FIND_LINKS=
ARG INSTALL_XFORMERS=0
ARG WITH_RAY=0
ARG APP_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt requirements-ray.txt ./
RUN --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} \
    && pip install -r requirements.txt \
    && if [ "${INSTALL_XFORMERS}" = "1" ]; then pip install xformers --index-url "${TORCH_INDEX_URL}"; fi \
    && if [ "${WITH_RAY}" = "1" ]; then pip install -r requirements-ray.txt; fi \
    && pip check

# Non-root user (the base image's "ubuntu" user holds uid 1000: replace it) and the volume folders.
RUN userdel --remove ubuntu 2>/dev/null || true \
    && useradd --create-home --uid "${APP_UID}" --shell /usr/sbin/nologin app \
    && mkdir -p /models /outputs /cache/huggingface \
    && chown app:app /models /outputs /cache/huggingface
COPY --chown=app:app . /app
USER app

# app.py reads LDM_<FLAG> as flag defaults: set LDM_AUTH=user:pass (or LDM_AUTH_FILE) at run time,
# LDM_MODEL=/models/<folder> for your own model (default: the bundled weights/demo); /models is also the
# models folder (Stable-diffusion/, Lora/, VAE/, embeddings/: switch checkpoints and VAEs in the UI).
ENV HF_HOME=/cache/huggingface \
    LDM_HOST=0.0.0.0 \
    LDM_PORT=7860 \
    LDM_OUTPUTS=/outputs \
    LDM_MODELS_DIR=/models
VOLUME ["/models", "/cache/huggingface", "/outputs"]
EXPOSE 7860

# Any HTTP answer proves liveness (with auth on, pages may answer 401); only no answer or a 5xx fails.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD python -c "import http.client, os; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('LDM_PORT', '7860')), timeout=5); c.request('GET', '/'); raise SystemExit(0 if c.getresponse().status < 500 else 1)"

# Python turns SIGINT into KeyboardInterrupt, which Gradio handles by closing the server; as PID 1 it
# would ignore docker stop's default SIGTERM and be killed at the timeout.
STOPSIGNAL SIGINT
CMD ["python", "app.py"]
