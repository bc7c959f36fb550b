"""Malformed model files fail with a ModelLoadError naming the file and the problem, never a raw
exception or a hang: safetensors headers are validated in full, tensor shapes are compared with the
config before any data is read, missing tensors are refused, and FIFOs/directories named like model
files are refused before they are opened."""
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import ldm
from ldm import ModelLoadError
from ldm.components import check_safetensors

GEN = dict(width=32, height=32, steps=2, seed=5, sampler="Euler")
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


def write_safetensors(path: Path, header, data: bytes) -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def copy_model(base_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_model, tmp_path / "model"))


def f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


# ---- safetensors headers --------------------------------------------------------------------------

MALFORMED = {  # id: (header, data, what the message must say)
    "array header": ([], b"", r"the header is an array, not an object"),
    "string tensor info": ({"w": "F32"}, b"", r"tensor 'w' is described by a string, not an object"),
    "string offsets": ({"w": f32([2], ["0", "8"])}, b"\0" * 8, r"tensor 'w' has data_offsets \['0', '8'\]"),
    "negative offsets": ({"w": f32([2], [-8, 0])}, b"\0" * 8, r"tensor 'w' has data_offsets \[-8, 0\]"),
    "empty offsets": ({"w": f32([2], [])}, b"\0" * 8, r"tensor 'w' has data_offsets \[\]"),
    "reversed offsets": ({"w": f32([0], [8, 0])}, b"\0" * 8, r"tensor 'w' has data_offsets \[8, 0\]: begin after end"),
    "shape/offset mismatch": ({"w": f32([3], [0, 8])}, b"\0" * 8,
                              r"tensor 'w' is F32 \[3\] \(12 bytes\) but its data_offsets span 8 bytes"),
    "unknown dtype": ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
                      r"tensor 'w' has unknown dtype 'Q4'"),
    "negative shape": ({"w": f32([-2], [0, 8])}, b"\0" * 8, r"tensor 'w' has shape \[-2\]"),
    "string shape": ({"w": f32(["2"], [0, 8])}, b"\0" * 8, r"tensor 'w' has shape \['2'\]"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "w": f32([2], [0, 8])}, b"\0" * 8,
                             r"__metadata__ must be an object of strings"),
    "overlapping tensors": ({"a": f32([2], [0, 8]), "b": f32([2], [0, 8])}, b"\0" * 8, r"tensor 'b' overlaps another"),
    "trailing bytes": ({"w": f32([2], [0, 8])}, b"\0" * 12, r"4 bytes after the last tensor"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_safetensors_are_refused_naming_file_and_problem(base_model, tmp_path, case):
    header, data, why = MALFORMED[case]
    model = copy_model(base_model, tmp_path)
    write_safetensors(model / WEIGHTS["unet"], header, data)  # in a diffusers folder
    with pytest.raises(ModelLoadError, match=rf"corrupt or incomplete file: .*unet/diffusion_pytorch_model\.safetensors \({why}"):
        ldm.load(model, device="cpu")
    single = write_safetensors(tmp_path / "single.safetensors", header, data)  # and as a single-file checkpoint
    with pytest.raises(ModelLoadError, match=rf"corrupt or incomplete file: .*single\.safetensors \({why}"):
        ldm.load(single, device="cpu")


def test_check_safetensors_returns_dtype_and_shape_of_each_tensor(tmp_path):
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16), "c": torch.zeros(0, 5)}, file,
              metadata={"format": "pt"})
    assert check_safetensors(file) == {"a": ("F32", (2, 3)), "b": ("F16", (4,)), "c": ("F32", (0, 5))}


def test_directory_named_like_a_weights_file_is_refused(base_model, tmp_path):
    model = copy_model(base_model, tmp_path)
    (model / "unet" / "extra.safetensors").mkdir()
    with pytest.raises(ModelLoadError, match=r"unet/extra\.safetensors is not a regular file \(a directory\)"):
        ldm.load(model, device="cpu")
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(ModelLoadError, match=r"x\.safetensors is not a diffusers model folder"):
        ldm.load(tmp_path / "x.safetensors", device="cpu")


# ---- weights that do not fit the config -----------------------------------------------------------


def _forbid_reading_weights(monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("from_pretrained was called: weights were read before the shapes were compared")

    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", read)


@pytest.mark.parametrize("component, tensor, prefix", [
    ("unet", "conv_in.weight", ""),
    ("vae", "quant_conv.weight", ""),
    ("text_encoder", "final_layer_norm.weight", "text_model."),  # the canonical file layout carries the prefix
])
def test_wrong_tensor_shape_is_refused_before_any_weights_are_read(base_model, tmp_path, monkeypatch, component, tensor, prefix):
    model = copy_model(base_model, tmp_path)
    file = model / WEIGHTS[component]
    sd = load_file(file)
    expected = list(sd[tensor].shape)
    sd[tensor] = sd[tensor].reshape(-1, 1)  # same bytes, another shape: a valid file for another config
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, file)
    _forbid_reading_weights(monkeypatch)
    found = [expected[0] * int(np.prod(expected[1:])), 1]
    with pytest.raises(ModelLoadError, match=rf"{file}: tensor {prefix}{tensor} has shape \[{found[0]}, 1\] but the .* "
                                             rf"config in .*{component} expects \[{', '.join(map(str, expected))}\]"):
        ldm.load(model, device="cpu")


def test_text_encoder_with_the_text_model_prefix_still_loads(base_model, base_pipe, tmp_path):
    model = copy_model(base_model, tmp_path)
    file = model / WEIGHTS["text_encoder"]
    save_file({"text_model." + k.removeprefix("text_model."): v for k, v in load_file(file).items()}, file)
    pipe = ldm.load(model, device="cpu", dtype="float32")
    a, b = pipe.txt2img("a red fox", **GEN), base_pipe.txt2img("a red fox", **GEN)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


@pytest.mark.parametrize("component, tensor", [("unet", "conv_out.bias"), ("vae", "quant_conv.weight"),
                                               ("text_encoder", "final_layer_norm.weight")])
def test_missing_tensor_is_refused_naming_file_and_tensor(base_model, tmp_path, component, tensor):
    model = copy_model(base_model, tmp_path)
    file = model / WEIGHTS[component]
    sd = load_file(file)
    del sd[tensor]
    save_file(sd, file)
    with pytest.raises(ModelLoadError, match=rf"{file}: the .* weights are incomplete \(1 tensor missing, e\.g\. {tensor}\)"):
        ldm.load(model, device="cpu")


@pytest.mark.parametrize("path, message", [
    ("unet/config.json", r"/unet: the U-Net could not be loaded \(OSError"),
    ("tokenizer/vocab.json", r"/tokenizer: the tokenizer could not be loaded"),
    ("scheduler/scheduler_config.json", r"corrupt file: .*scheduler_config\.json is not valid JSON"),
])
def test_corrupt_component_files_become_model_load_errors(base_model, tmp_path, path, message):
    model = copy_model(base_model, tmp_path)
    (model / path).write_text("{not json")
    with pytest.raises(ModelLoadError, match=message):
        ldm.load(model, device="cpu")


# ---- FIFOs: open() would block forever -------------------------------------------------------------


def load_without_hanging(fifo: Path, *args, **kwargs) -> BaseException | None:
    """ldm.load in a thread; if it is still blocked after 20 s, a writer that closes at once unblocks it and the test fails."""
    outcome = {}

    def run():
        try:
            ldm.load(*args, **kwargs)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(10)
        pytest.fail(f"ldm.load blocked on the FIFO {fifo}")
    return outcome["error"]


@pytest.mark.parametrize("path", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json", "text_encoder/config.json",
                                  "scheduler/scheduler_config.json", "tokenizer/merges.txt"])
def test_fifo_in_a_model_folder_is_refused_not_opened(base_model, tmp_path, path):
    model = copy_model(base_model, tmp_path)
    fifo = model / path
    fifo.unlink()
    os.mkfifo(fifo)
    error = load_without_hanging(fifo, model, device="cpu")
    assert isinstance(error, ModelLoadError) and f"{fifo} is not a regular file (a FIFO)" in str(error), error


@pytest.mark.parametrize("name, kwargs", [("model.safetensors", {}), ("model.ckpt", {"allow_pickle": True})])
def test_fifo_as_a_single_file_is_refused(tmp_path, name, kwargs):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    error = load_without_hanging(fifo, fifo, device="cpu", **kwargs)
    assert isinstance(error, ModelLoadError) and f"{fifo} is not a regular file (a FIFO)" in str(error), error


def test_fifo_in_a_single_file_config_folder_is_refused(base_model, tmp_path):
    checkpoint = tmp_path / "sd1.safetensors"  # SD 1.x keys: detected, then the config folder is read
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 1, 1),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, checkpoint)
    config = Path(shutil.copytree(base_model, tmp_path / "config", ignore=shutil.ignore_patterns("*.safetensors")))
    fifo = config / "tokenizer" / "merges.txt"
    fifo.unlink()
    os.mkfifo(fifo)
    error = load_without_hanging(fifo, checkpoint, config=config, device="cpu")
    assert isinstance(error, ModelLoadError) and f"{fifo} is not a regular file (a FIFO)" in str(error), error


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """1 safetensors file in 256 has a header length whose first byte is 0x80 (pickle's PROTO opcode)."""
    file = tmp_path / "model.safetensors"
    for pad in range(512):
        save_file({"w": torch.zeros(2)}, file, metadata={"pad": "x" * pad})
        if file.read_bytes()[:1] == b"\x80":
            break
    assert file.read_bytes()[:1] == b"\x80"
    assert check_safetensors(file) == {"w": ("F32", (2,))}
