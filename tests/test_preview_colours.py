"""Live previews in the model's own colours (issue 17 item 14, library part): a least-squares
latent -> RGB map fitted on a few decodes beats the fixed SD 1.x factors on latents it never saw."""
from __future__ import annotations

import torch

from ldm import latents


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


def test_the_ui_fits_once_per_model_and_previews_with_it(base_pipe, tmp_path):
    from ui import state, streaming, tasks

    first = streaming.preview_colours(base_pipe)
    assert first is streaming.preview_colours(base_pipe) and first.shape[1] == 3  # cached per model
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=tmp_path, preview_every=1))
    steps = [i for i in tasks.txt2img(ctx, prompt="x", steps=3, seed=1, width=32, height=32)
             if isinstance(i, streaming.Step) and i.preview is not None]
    assert steps and steps[0].preview.mode == "RGB"
