"""The replicas as a Serve application of their own, for a KubeRay RayService or `serve run`:

    serve run scaleout.service:build model=/models/sd15 kind=base replicas=2

A front end started with `--backend ray --ray-address ...` uses an application named `ldm-<kind>` that
is already running (here: the RayService's) instead of deploying its own, and leaves it running when it
exits. `model` must be the path the front end's --model gives (the replicas' preloaded model is keyed
by it; another path only costs one more load per replica). Arguments: model, kind (base, inpaint,
upscale), replicas or autoscale (MIN:MAX), cpus_per_replica, gpus_per_replica (default 1), device,
dtype, models_dir, max_loaded_models, and the model options max_size, vae_tiling, attention, offload.
"""
from __future__ import annotations

import json

from ray import serve

import ldm

from .config import ScaleOut, parse_autoscale
from .replica import Generator, LoadSettings

APP_PREFIX = "ldm-"  # application name = APP_PREFIX + model kind


def build(args: dict[str, str]):
    if "model" not in args:
        raise ValueError("scaleout.service:build needs model=PATH (the front end's --model)")
    kind = args.get("kind", "base")
    if kind not in ("base", "inpaint", "upscale"):
        raise ValueError(f"kind must be base, inpaint or upscale, got {kind!r}")
    scale = ScaleOut(replicas=int(args["replicas"]) if "replicas" in args else None,
                     autoscale=parse_autoscale(args["autoscale"]) if "autoscale" in args else None,
                     gpus_per_replica=float(args.get("gpus_per_replica", 1)),
                     cpus_per_replica=float(args.get("cpus_per_replica", 1))).validate()
    options = ldm.Options(max_size=int(args.get("max_size", 2048)),
                          vae_tiling=str(args.get("vae_tiling", "")).lower() in ("1", "true", "yes"),
                          attention=args.get("attention", "auto"), offload=args.get("offload", "none")).validate()
    settings = LoadSettings(device=args.get("device"), dtype=args.get("dtype"), options=options,
                            models_dir=args.get("models_dir"))
    first = json.dumps({"model": str(args["model"]), "vae": None})
    deployment = serve.deployment(Generator, name=kind).options(**scale.serve_options(scale.gpus_per_replica))
    return deployment.bind(first, settings, int(args.get("max_loaded_models", 1)))
