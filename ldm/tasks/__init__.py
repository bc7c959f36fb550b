"""Tasks: each prepares its inputs, validates before any model work, and starts the engine's one loop.

generate   txt2img, img2img
inpaint    inpaint, outpaint (9-channel models via extra U-Net inputs, 4-channel via a post-step blend)
hires      A1111's hires fix: img2img started from enlarged latents or pixels
upscale_x4 diffusion x4 upscaler, tiled for large inputs

Tasks import the engine, the extensions and the codecs (latents, images, masks, params); nothing
imports a task except `ldm.pipeline`, and no task imports another's private names.
"""
