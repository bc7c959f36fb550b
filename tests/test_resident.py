"""Weights copied out of mmapped safetensors files (ldm.resident): same values, private memory, and the
copy does not count the file's pages in the process's memory as well (the load peak does not double)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm.resident import file_mappings, keep_resident

ROOT = Path(__file__).resolve().parents[1]

SMAPS = """\
7f00-7f80 rw-p 00001000 fd:01 12                         /models/unet/diffusion_pytorch_model.safetensors
Size:                  2 kB
Anonymous:             0 kB
7f80-7fc0 rw-p 00000000 fd:01 14                         /models/vae/diffusion_pytorch_model.safetensors
Anonymous:             4 kB
7fc0-7fff r-xp 00000000 fd:01 13                         /usr/lib/libc.so.6
Anonymous:             0 kB
"""


def test_file_mappings_parse_smaps():
    unet, vae = file_mappings(SMAPS)
    assert (unet.lo, unet.hi, unet.offset, unet.device, unet.inode) == (0x7F00, 0x7F80, 0x1000, (0xFD, 1), 12)
    assert not unet.modified  # written pages (Anonymous > 0) mean the mapping may differ from the file
    assert vae.modified and vae.path == "/models/vae/diffusion_pytorch_model.safetensors"


def _mapped_linear(file: Path, n: int) -> torch.nn.Linear:
    from safetensors.torch import load_file

    linear = torch.nn.Linear(n, n, device="meta")
    linear.load_state_dict(load_file(file), assign=True)  # parameters are views of the mapped file
    return linear


def test_copies_equal_the_file_and_leave_the_mapping(tmp_path):
    from safetensors.torch import save_file

    weights = {"weight": torch.randn(64, 64), "bias": torch.randn(64)}
    save_file(weights, tmp_path / "w.safetensors")
    linear = _mapped_linear(tmp_path / "w.safetensors", 64)
    assert any(m.holds(linear.weight.data_ptr()) for m in file_mappings())
    assert keep_resident([linear, None]) == (64 * 64 + 64) * 4
    assert torch.equal(linear.weight, weights["weight"]) and torch.equal(linear.bias, weights["bias"])
    assert not any(m.holds(p.data_ptr()) for p in linear.parameters() for m in file_mappings())
    assert keep_resident([linear]) == 0


PEAK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from ldm.resident import keep_resident

    def kb(field):
        return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))

    linear = torch.nn.Linear({n}, {n}, bias=False, device="meta")
    linear.load_state_dict(load_file(sys.argv[1]), assign=True)
    before = kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    copied = keep_resident([linear])
    print(copied, (kb("VmHWM") - before) * 1024)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_load_peak_is_the_weights_once_not_twice(tmp_path):
    """~200 MB of mapped weights: copying them grows the peak RSS by about their size. Copying through the
    mapping (the former way) faulted every file page into the process too: ~2x."""
    from safetensors.torch import save_file

    n = 7000
    save_file({"weight": torch.randn(n, n)}, tmp_path / "big.safetensors")
    out = subprocess.run([sys.executable, "-c", PEAK.format(n=n), str(tmp_path / "big.safetensors")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    copied, growth = int(out[0]), int(out[1])
    assert copied == n * n * 4
    assert growth < 1.25 * copied, f"peak grew by {growth / 2**20:.0f} MB for {copied / 2**20:.0f} MB of weights"


def test_vocabulary_tables_stay_mapped(tmp_path):
    """A prompt reads a few rows of a token embedding: the table stays file-backed, everything else is copied."""
    from safetensors.torch import load_file, save_file

    model = torch.nn.Sequential(torch.nn.Embedding(2048, 8), torch.nn.Embedding(77, 8), torch.nn.Linear(8, 8))
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    mapped = torch.nn.Sequential(torch.nn.Embedding(2048, 8), torch.nn.Embedding(77, 8), torch.nn.Linear(8, 8)).to("meta")
    mapped.load_state_dict(load_file(tmp_path / "m.safetensors"), assign=True)
    assert keep_resident([mapped]) == (77 * 8 + 8 * 8 + 8) * 4  # positions and the linear layer
    maps = file_mappings()
    assert any(m.holds(mapped[0].weight.data_ptr()) for m in maps)
    assert not any(m.holds(p.data_ptr()) for p in (*mapped[1].parameters(), *mapped[2].parameters()) for m in maps)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), mapped.state_dict().values()))


# ---- what stays mapped on purpose: parts a model's usual request never reads (ldm.accel.read_on_demand) -------------


def _in_maps(tensors) -> list[bool]:
    maps = file_mappings()
    return [any(m.holds(t.data_ptr()) for m in maps) for t in tensors]


def test_vae_encoder_stays_mapped_the_rest_is_private(base_model):
    """txt2img never reads the VAE's encoder: after ldm.load it is still a view of the mapped file (diffusers never
    pages it in either), while the decoder, the U-Net and the text encoder are private copies."""
    import ldm

    pipe = ldm.load(base_model, device="cpu", dtype="float32")
    vae = pipe.vae
    assert all(_in_maps((*vae.encoder.parameters(), *vae.quant_conv.parameters())))
    text = [t for name, t in pipe.text_encoder.named_parameters() if "token_embedding" not in name]  # a sparse table
    private = (*vae.decoder.parameters(), *vae.post_quant_conv.parameters(), *pipe.unet.parameters(), *text)
    assert not any(_in_maps(private))


def test_img2img_reads_the_mapped_encoder_with_the_same_pixels(base_model):
    """img2img faults the mapped encoder in from the file: the same pixels as with a private copy, and the run
    leaves it mapped."""
    import numpy as np
    from PIL import Image

    import ldm

    pipe = ldm.load(base_model, device="cpu", dtype="float32")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(strength=0.6, steps=3, seed=4, sampler="DDIM")
    mapped = np.asarray(pipe.img2img(init, "a house", **kw).images[0])
    assert all(_in_maps(pipe.vae.encoder.parameters()))
    assert keep_resident([pipe.vae]) > 0  # now the encoder is a private copy too
    assert not any(_in_maps(pipe.vae.encoder.parameters()))
    assert np.array_equal(mapped, np.asarray(pipe.img2img(init, "a house", **kw).images[0]))


def test_read_on_demand_by_model_kind():
    """Every request of an inpainting model encodes the masked image: its encoder is kept resident."""
    from types import SimpleNamespace

    import tiny
    from ldm.accel import read_on_demand
    from ldm.components import ModelKind

    vae = tiny.vae()
    for kind in (ModelKind.BASE, ModelKind.UPSCALE, ModelKind.REFINER):
        assert read_on_demand(SimpleNamespace(kind=kind, vae=vae)) == (vae.encoder, vae.quant_conv)
    assert read_on_demand(SimpleNamespace(kind=ModelKind.INPAINT, vae=vae)) == ()
