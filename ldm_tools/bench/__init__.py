"""Side-by-side benchmark of ldm against diffusers' StableDiffusionPipeline: `python -m ldm_tools.bench --help`.

Random, seeded SD-1.5-shaped weights are built once and cached as a diffusers folder; every
configuration then runs in one process, alternating, so load from other jobs hits all of them alike.
"""
