"""The benchmark's real-size SDXL single-file writer (ldm_tools.bench.sdxl_file), checked on tiny SDXL configs:
the same original-layout keys and shapes as the tests' writer, and `ldm.load` reads the file it writes."""
import torch

import ldm
import tiny_sdxl
from ldm_tools.bench import sdxl_file
from test_sdxl_single_file import sdxl_original_layout


def test_original_shapes_match_the_tests_layout(tmp_path):
    folder = tiny_sdxl.save_model(tmp_path / "tiny-sdxl")
    expected = {k: tuple(v.shape) for k, v in sdxl_original_layout(folder).items()}
    expected.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", None)
    assert sdxl_file.original_shapes(folder) == expected


def test_written_file_loads(tmp_path):
    folder = tiny_sdxl.save_model(tmp_path / "tiny-sdxl")
    file = tmp_path / "random.safetensors"
    shapes = sdxl_file.original_shapes(folder)
    n = sdxl_file.write_random(file, shapes)
    assert n == sum(torch.Size(s).numel() * 2 for s in shapes.values())
    pipe = ldm.load(file, config=folder, device="cpu", dtype="float16")
    assert pipe.family.name == "sdxl" and pipe.unet.dtype == torch.float16
    assert torch.equal(pipe.unet.conv_norm_out.weight, torch.ones_like(pipe.unet.conv_norm_out.weight))
    assert 0.01 < pipe.unet.conv_in.weight.float().std() < 0.03


def test_sdxl_step_sides_agree(tmp_path):
    """The benchmark's two sides (our load + loop, diffusers' from_single_file + SDXL pipeline) compute the same steps."""
    from ldm_tools.bench import sdxl_step

    folder = tiny_sdxl.save_model(tmp_path / "tiny-sdxl")
    file = tmp_path / "random.safetensors"
    sdxl_file.write_random(file, sdxl_file.original_shapes(folder))
    outs, ticks = {}, []
    for side, load, step in (("ours", sdxl_step.load_ours, sdxl_step.step_ours),
                             ("diffusers", sdxl_step.load_diffusers, sdxl_step.step_diffusers)):
        unet = load(file, folder)
        assert unet.dtype == torch.float32
        outs[side] = step(unet, sdxl_step.inputs(unet.config, 64), 2, 5.0, lambda: ticks.append(side))
    assert ticks == ["ours"] * 2 + ["diffusers"] * 2
    torch.testing.assert_close(outs["ours"], outs["diffusers"], atol=1e-5, rtol=1e-5)
