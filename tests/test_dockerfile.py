"""The GPU Dockerfile's structure. CI also builds and runs a CPU variant of the same file for real
(.ci/docker_ci.sh); these tests pin what that run cannot see: the CUDA defaults."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)


def pinned(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.fullmatch(rf"{package}==([\w.+-]+)", line.split("#")[0].strip())
        if m:
            return m[1]
    pytest.fail(f"{package} is not pinned in requirements.txt")


def runs() -> str:
    return "\n".join(a for k, a in instructions() if k == "RUN")


def test_cuda_runtime_base_image():
    froms = [a for k, a in instructions() if k == "FROM"]
    assert froms == ["${BASE_IMAGE}"]  # a build argument, so CI can build the CPU variant from this file
    base = args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base


def test_torch_matches_requirements_and_the_cuda_index():
    a = args()
    assert a["TORCH_VERSION"] == pinned("torch")
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", DOCKERFILE.read_text())
    assert a["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"
    # torch first from that index, then the pinned requirements (torch already satisfied)
    r = runs()
    torch_at = r.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    assert args()["TORCH_FIND_LINKS"] == ""  # the default build takes torch from the CUDA index only
    assert torch_at < r.index("pip install -r requirements.txt")


def test_requirements_are_copied_and_installed():
    copies = [a for k, a in instructions() if k == "COPY"]
    assert any(shlex.split(c)[0] == "requirements.txt" for c in copies)
    assert "pip install -r requirements.txt" in runs()


def test_xformers_is_an_optional_build_arg_off_by_default():
    assert args()["INSTALL_XFORMERS"] == "0"
    assert re.search(r'if \[ "\$\{INSTALL_XFORMERS\}" = "1" \]; then pip install xformers', runs())


def test_ray_is_an_optional_build_arg_off_by_default():
    assert args()["WITH_RAY"] == "0"
    copies = [shlex.split(a) for k, a in instructions() if k == "COPY"]
    assert any("requirements-ray.txt" in c[:-1] for c in copies)  # copied with requirements.txt, before the code
    assert re.search(r'if \[ "\$\{WITH_RAY\}" = "1" \]; then pip install -r requirements-ray.txt; fi', runs())
    assert "ray" not in (ROOT / "requirements.txt").read_text()  # the default install does not need it


def test_runs_as_a_non_root_user():
    steps = instructions()
    users = [(i, a) for i, (k, a) in enumerate(steps) if k == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0")
    assert "useradd" in runs() and users[-1][1] in runs()
    cmd_at = max(i for i, (k, _) in enumerate(steps) if k == "CMD")
    assert users[-1][0] < cmd_at  # the app starts as that user


def test_serves_on_all_interfaces_port_7860_with_auth_from_env():
    text = DOCKERFILE.read_text()
    assert ("EXPOSE", "7860") in instructions()
    assert "LDM_HOST=0.0.0.0" in text and "LDM_PORT=7860" in text
    assert "LDM_AUTH" in text  # documented: auth comes from the environment at run time
    app = (ROOT / "app.py").read_text()
    assert 'env("AUTH")' in app and 'env("HOST"' in app and 'env("PORT"' in app
    cmd = [a for k, a in instructions() if k == "CMD"][-1]
    assert cmd == '["python", "app.py"]'


def test_healthcheck_hits_the_app():
    checks = [a for k, a in instructions() if k == "HEALTHCHECK"]
    assert len(checks) == 1
    check = checks[0]
    assert "CMD python -c" in check and "127.0.0.1" in check and "'GET', '/'" in check
    assert "--start-period=" in check  # model loading takes a while


def test_volumes_for_models_cache_and_outputs():
    volumes = " ".join(a for k, a in instructions() if k == "VOLUME")
    for path in ("/models", "/cache/huggingface", "/outputs"):
        assert f'"{path}"' in volumes
    assert "HF_HOME=/cache/huggingface" in DOCKERFILE.read_text()
    assert "LDM_OUTPUTS=/outputs" in DOCKERFILE.read_text()


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    for entry in (".git", "runs/", "outputs/", "artifacts/", "**/__pycache__/", ".pytest_cache/"):
        assert entry in ignored
    assert not any(e.startswith("weights") for e in ignored)  # the bundled demo model ships in the image


def test_ci_builds_and_runs_the_image_from_this_dockerfile():
    script = (ROOT / ".ci" / "docker_ci.sh").read_text()
    assert (ROOT / ".ci" / "docker_ci.sh").stat().st_mode & 0o111
    for arg in ("BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_FIND_LINKS"):
        assert f"--build-arg {arg}=" in script and arg in args()
    assert "--secret id=pip_ca" in script and "--read-only" in script and "docker stop" in script.replace('"$DOCKER"', "docker")
    assert "bash .ci/docker_ci.sh" in (ROOT / ".ci" / "run").read_text()


def test_ca_bundle_is_a_build_secret_not_a_layer():
    r = runs()
    assert "--mount=type=secret,id=pip_ca" in r and "PIP_CERT=/run/secrets/pip_ca" in r
    assert not any("pip_ca" in a or ".crt" in a for k, a in instructions() if k in ("COPY", "ADD", "ENV"))


def test_stops_on_docker_stop():
    assert ("STOPSIGNAL", "SIGINT") in instructions()  # Python as PID 1 ignores SIGTERM
