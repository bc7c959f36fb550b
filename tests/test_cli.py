import subprocess
import sys
from pathlib import Path

from PIL import Image

from ldm.metadata import parse_infotext, read_infotext

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ldm", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_cli_txt2img_then_img2img(base_model, tmp_path):
    out = tmp_path / "a.png"
    r = run("txt2img", "--model", str(base_model), "a red circle", "--seed", "3", "--steps", "2", "--sampler", "Euler a",
            "--width", "32", "--height", "32", "--batch-size", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert paths == [str(tmp_path / "a-1.png"), str(tmp_path / "a-2.png")]
    info = parse_infotext(read_infotext(Image.open(paths[1])))
    assert info["Seed"] == "4" and info["Sampler"] == "Euler a" and info["Prompt"] == "a red circle"
    assert "step" in r.stderr  # tqdm progress bar

    r = run("img2img", "--model", str(base_model), "--image", paths[0], "x", "--strength", "0.5", "--steps", "2",
            "--seed", "1", "--out", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "b.png").size == (32, 32)


def test_cli_bad_arguments_exit_nonzero_with_message(base_model, tmp_path):
    r = run("txt2img", "--model", str(base_model), "x", "--width", "33", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "not a multiple of 8" in r.stderr
    r = run("txt2img", "--model", str(base_model), "x", "--sampler", "Foo", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "unknown sampler 'Foo'" in r.stderr
    assert not (tmp_path / "x.png").exists()
