"""`pip install .` gives a working library: the wheel holds `ldm` (every module and the bundled configs)
and nothing else (no ldm_tools/, ui/, tests/), and the installed copy generates from outside the checkout.

Offline: the wheel is built with the venv's setuptools (requirements-dev.txt), without build isolation
or an index, from a copy of the checkout so build/ and *.egg-info are not written into the repo."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "demo"
# Top-level entries of the checkout not needed to build (large, generated, or someone else's state).
NOT_COPIED = {".git", ".venv", "venv", "weights", "runs", "outputs", "artifacts", ".cache", ".pytest_cache", "build"}


def _pip(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "--disable-pip-version-check", "-q"],
                       cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip {args[0]} failed:\n{r.stdout}\n{r.stderr}"


def _requirement(line: str) -> tuple[str, str]:
    """'huggingface_hub==2.4.0' -> ('huggingface-hub', '==2.4.0'): name normalised as pip does."""
    name, spec = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$", line).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.replace(" ", "")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel file, the source copy it was built from)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for entry in ROOT.iterdir():
        if entry.name in NOT_COPIED or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, src / entry.name, ignore=skip)
        else:
            shutil.copy2(entry, src / entry.name)
    _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), cwd=tmp)
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl, src


def test_wheel_holds_the_library_and_its_configs_only(wheel):
    whl, src = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    files = names - dist_info
    assert "ldm/configs/clip-tokenizer/vocab.json" in files
    assert "ldm/configs/sd15/unet/config.json" in files
    assert not [n for n in files if n.startswith(("ldm_tools/", "ui/", "tests/", "tools/"))]
    assert all(n.startswith("ldm/") for n in files), sorted(n for n in files if not n.startswith("ldm/"))
    in_source = {p.relative_to(src).as_posix() for p in (src / "ldm").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert in_source - files == set(), "files of ldm/ missing from the wheel"
    assert files - in_source == set()


def test_wheel_requires_the_pinned_library_dependencies_without_the_ui(wheel):
    whl, _ = wheel
    zf = zipfile.ZipFile(whl)
    (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    required = {_requirement(line.split(":", 1)[1].split(";")[0])
                for line in zf.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")}
    pinned = {_requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith(("#", "-"))}
    assert required == {r for r in pinned if r[0] != "gradio"}


def test_installed_wheel_generates_outside_the_checkout(wheel, tmp_path):
    whl, _ = wheel
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(whl), cwd=tmp_path)
    native = json.loads((DEMO / "unet" / "config.json").read_text())["sample_size"] * 2 ** (
        len(json.loads((DEMO / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    code = ("import json, ldm; p = ldm.load(%r); "
            "r = p.txt2img('a red circle on a blue background', steps=2, seed=1, width=%d, height=%d); "
            "print(json.dumps({'file': ldm.__file__, 'size': r.images[0].size}))") % (str(DEMO), native, native)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(site.resolve())
    assert not Path(out["file"]).resolve().is_relative_to(ROOT)
    assert out["size"] == [native, native]
