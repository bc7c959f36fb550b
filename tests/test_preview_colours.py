"""Live previews in the model's own colours (issue 17 item 14, library part): a model with a small VAE
is previewed by that VAE; one with a large VAE by its family's TAESD decoder from the models folder, or
else by a least-squares latent -> RGB map fitted on a few decodes, which beats the fixed SD 1.x factors
on latents it never saw."""
from __future__ import annotations

import torch

from ldm import latents, previews


def test_fitted_preview_map_matches_the_vae_better_than_sd_factors(base_pipe):
    vae = base_pipe.components.vae
    rgb_map = latents.fit_preview_map(vae)
    assert rgb_map.shape == (vae.config.latent_channels + 1, 3)
    held_out = torch.randn(2, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        truth = torch.nn.functional.adaptive_avg_pool2d(latents.decode(vae, held_out), 8)
    truth = ((truth + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1)

    def error(preview):
        return (preview.float() - truth).abs().mean().item()

    fitted, fixed = error(latents.preview(held_out, rgb_map)), error(latents.preview(held_out))
    assert fitted < fixed, (fitted, fixed)
    assert latents.preview(held_out, rgb_map).dtype == torch.uint8
    assert torch.equal(latents.preview(held_out, torch.zeros(2, 3)), latents.preview(held_out))  # wrong shape: ignored


def test_a_small_vae_previews_with_its_own_decode(base_pipe):
    draw = base_pipe.previewer()
    assert draw.method == previews.PreviewMethod.FULL
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoded = latents.decode(base_pipe.components.vae, z[:1])
    expected = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(draw(z), expected)  # the first image of the batch, at full size


def test_a_large_vae_previews_with_taesd_when_the_models_folder_has_one(tmp_path, monkeypatch):
    import ldm
    from test_fast_modes import _model_with_8x_vae, _random_taesd, _save_original_layout

    monkeypatch.setattr(previews, "SMALL_DECODER", 0)  # every VAE counts as large
    folder = tmp_path / "models"
    pipe = ldm.load(_model_with_8x_vae(tmp_path / "model"), device="cpu", dtype="float32", models_dir=folder)
    linear = pipe.previewer()
    assert linear.method == previews.PreviewMethod.LINEAR
    (folder / "VAE-approx").mkdir(parents=True)
    tiny = _random_taesd()
    _save_original_layout(tiny, folder / "VAE-approx" / "taesd_decoder.safetensors")
    approx = pipe.previewer()
    assert approx.method == previews.PreviewMethod.TAESD
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ((tiny.decode(z, return_dict=False)[0][0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
    assert torch.equal(approx(z), expected.to(torch.uint8))
    assert linear(z).shape == (8, 8, 3) and approx(z).shape == (64, 64, 3)


def test_the_ui_sets_previews_up_once_per_model_and_previews_with_them(base_pipe, tmp_path):
    from ui import state, streaming, tasks

    first = streaming.previewer(base_pipe)
    assert first is streaming.previewer(base_pipe)  # cached per model
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=tmp_path, preview_every=1))
    steps = [i for i in tasks.txt2img(ctx, prompt="x", steps=3, seed=1, width=32, height=32)
             if isinstance(i, streaming.Step) and i.preview is not None]
    assert steps and steps[0].preview.mode == "RGB"
