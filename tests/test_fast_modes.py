"""Opt-in fast modes of performance round 2: token merging (ldm.extensions.tome) and the TAESD
approximate decoder (ldm.approx_decoder); and the per-run overhead fixes keep the default path exact."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm import approx_decoder, images
from ldm.devices import weights_dtype
from ldm.extensions import FastPreset
from ldm.extensions.tome import TokenMerging, bipartite_merge, token_grid
from ldm.tasks import generate

RUN = dict(width=64, height=64, steps=4, seed=3, sampler="DDIM", guidance_scale=7.0)


def px(result) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in result.images])


# ---- token merging ------------------------------------------------------------------------------


def test_merge_averages_groups_and_unmerge_restores_the_kept_tokens():
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_merge(x, (8, 8), 2, 20, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (2, 44, 16)
    back = unmerge(merged)
    for b in range(2):
        # Every token comes back as the mean of the tokens it was merged with: group by the unmerged rows.
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(back[b]):
            groups.setdefault(tuple(row.tolist()), []).append(i)
        assert len(groups) == 44  # 64 tokens in 44 groups
        for rows, idx in ((torch.tensor(k), v) for k, v in groups.items()):
            assert torch.allclose(rows, x[b, idx].mean(0), atol=1e-6)


def test_token_grid_matches_only_allowed_resolutions():
    assert token_grid((64, 64), 4096, 1) == (64, 64)
    assert token_grid((64, 64), 1024, 1) is None
    assert token_grid((64, 64), 1024, 2) == (32, 32)
    assert token_grid((9, 7), 20, 2) == (5, 4)  # odd sizes downsample with ceil, as the U-Net does


@pytest.mark.parametrize("bad", [dict(ratio=0), dict(ratio=1.0), dict(ratio=True), dict(max_downsample=3), dict(stride=1)])
def test_token_merging_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        TokenMerging(**bad)


def test_token_merging_changes_the_image_and_leaves_the_pipeline_untouched(base_pipe):
    plain = generate.txt2img(base_pipe, "a red cube", **RUN)
    # The tiny U-Net has attention only at half resolution, as SDXL.
    merged = generate.txt2img(base_pipe, "a red cube", extensions=[TokenMerging(0.5, max_downsample=2)], **RUN)
    again = generate.txt2img(base_pipe, "a red cube", **RUN)
    assert np.abs(px(plain) - px(merged)).max() > 0
    assert np.array_equal(px(plain), px(again))  # processors restored after the run
    assert "Token merging ratio: 0.5" in merged.infotexts[0]
    same = generate.txt2img(base_pipe, "a red cube", extensions=[TokenMerging(0.5, max_downsample=2)], **RUN)
    assert np.array_equal(px(merged), px(same))  # seeded destinations: reproducible
    untouched = generate.txt2img(base_pipe, "a red cube", extensions=[TokenMerging(0.5, max_downsample=1)], **RUN)
    assert np.array_equal(px(plain), px(untouched))  # no self-attention at full resolution here


def test_token_merging_combines_with_the_fast_preset(base_pipe):
    fast = generate.txt2img(base_pipe, "a red cube", extensions=[FastPreset()], **RUN)
    both = generate.txt2img(base_pipe, "a red cube", extensions=[FastPreset(), TokenMerging(0.5, max_downsample=2)], **RUN)
    assert np.abs(px(fast) - px(both)).max() > 0


# ---- approximate decoder --------------------------------------------------------------------------


def _random_taesd(seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny().eval()


def _save_original_layout(tiny, path):
    """The original taesd_decoder file: an nn.Sequential whose item 0 is the clamp, so every index is one higher."""
    state = {}
    for key, t in tiny.decoder.state_dict().items():
        _, index, rest = key.split(".", 2)
        state[f"{int(index) + 1}.{rest}"] = t.contiguous()
    save_file(state, str(path))


def _model_with_8x_vae(folder):
    """The tiny test model with an SD-like 4-level (8x) VAE, which TAESD's decoder matches."""
    import tiny as tiny_models
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, scaling_factor=0.18215).eval()
    return tiny_models.save_model(folder, vae_model=vae)


def test_taesd_file_from_the_models_folder_decodes_the_run(tmp_path):
    base_model = _model_with_8x_vae(tmp_path / "model")
    tiny = _random_taesd()
    folder = tmp_path / "models"
    (folder / "VAE-approx").mkdir(parents=True)
    _save_original_layout(tiny, folder / "VAE-approx" / "taesd_decoder.safetensors")
    pipe = ldm.load(base_model, device="cpu", dtype="float32", models_dir=folder)
    fast = pipe.with_approx_decode()
    full = pipe.txt2img("a red cube", **RUN)
    approx = fast.txt2img("a red cube", **RUN)
    assert torch.equal(full.latents, approx.latents)  # same loop; only the decode differs
    with torch.inference_mode():
        expected = images.tensor_to_pil(tiny.decode(full.latents, return_dict=False)[0])
    assert np.array_equal(px(approx), np.stack([np.asarray(im, np.int16) for im in expected]))
    assert np.abs(px(full) - px(approx)).max() > 0
    assert "VAE: approx taesd_decoder.safetensors" in approx.infotexts[0]
    preview = approx_decoder.approx_preview(fast.components.vae.decoder, full.latents)
    assert preview.shape == (1, 64, 64, 3) and preview.dtype == torch.uint8


def test_approx_decoder_folder_and_refusals(tmp_path, base_pipe):
    tiny = _random_taesd(1)
    tiny.save_pretrained(tmp_path / "taesd", safe_serialization=True)
    loaded = approx_decoder.load_approx_decoder(tmp_path / "taesd")
    assert all(torch.equal(a, b) for a, b in zip(loaded.decoder.state_dict().values(), tiny.decoder.state_dict().values()))
    (tmp_path / "taesd_decoder.pth").write_bytes(b"not loaded")
    with pytest.raises(ldm.ModelLoadError, match="safetensors"):
        approx_decoder.load_approx_decoder(tmp_path / "taesd_decoder.pth")
    save_file({"1.weight": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ldm.ModelLoadError, match="does not fit"):
        approx_decoder.load_approx_decoder(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="VAE-approx"):
        base_pipe.with_approx_decode()  # no models folder, no path: a readable error before any work
    with pytest.raises(ValueError, match="another model family"):
        base_pipe.with_approx_decode(tmp_path / "taesd")  # the tiny model's VAE is 2x, TAESD 8x


# ---- the overhead fixes keep the maths ---------------------------------------------------------


def test_weights_dtype_agrees_with_diffusers(base_pipe):
    assert weights_dtype(base_pipe.unet) == base_pipe.unet.dtype == torch.float32
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert weights_dtype(bf16) == torch.bfloat16


# ---- weights stay resident -------------------------------------------------------------------------


def test_mapped_file_ranges_parses_proc_maps():
    maps = ("7f00-7f80 r--s 00000000 fd:01 12 /models/unet/diffusion_pytorch_model.safetensors\n"
            "7f80-7fff r-xp 00000000 fd:01 13 /usr/lib/libc.so.6\n")
    from ldm.accel import mapped_file_ranges

    assert mapped_file_ranges(maps) == [(0x7F00, 0x7F80)]


def test_cpu_weights_are_copied_out_of_the_mapped_files(base_model):
    from ldm.accel import keep_resident, mapped_file_ranges
    from ldm.devices import ComponentDtypes
    from ldm.loading import load_components

    raw = load_components(base_model, device=torch.device("cpu"), dtype=ComponentDtypes.same(torch.float32))
    modules = (raw.text_encoder, raw.unet, raw.vae)
    before = [t.clone() for t in raw.unet.parameters()]
    assert keep_resident(modules) > 0  # diffusers leaves them as views of the mmapped safetensors files
    assert keep_resident(modules) == 0  # nothing left to copy
    assert all(torch.equal(a, b) for a, b in zip(before, raw.unet.parameters()))
    pipe = ldm.load(base_model, device="cpu", dtype="float32")
    ranges = mapped_file_ranges()
    assert not any(lo <= p.data_ptr() < hi for p in pipe.unet.parameters() for lo, hi in ranges)
