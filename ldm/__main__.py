"""Command line: `python -m ldm txt2img|img2img --model PATH "prompt" ...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import samplers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm", description="Generate images with a latent diffusion model.")
    sub = p.add_subparsers(dest="task", required=True)
    for task in ("txt2img", "img2img"):
        s = sub.add_parser(task, help=f"{task} generation")
        s.add_argument("prompt", nargs="?", default="")
        s.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "weights" / "demo"),
                       help="diffusers folder or hub id (default: the bundled demo model)")
        s.add_argument("--negative-prompt", default="")
        s.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
        s.add_argument("--steps", type=int, default=20)
        s.add_argument("--sampler", default=samplers.DEFAULT_SAMPLER, help=", ".join(samplers.sampler_names()))
        s.add_argument("--schedule", default=samplers.DEFAULT_SCHEDULE, help=", ".join(samplers.schedule_names()))
        s.add_argument("--cfg-scale", type=float, default=7.0)
        s.add_argument("--width", type=int, default=None, help="default: the model's native size")
        s.add_argument("--height", type=int, default=None)
        s.add_argument("--batch-size", type=int, default=1)
        s.add_argument("--clip-skip", type=int, default=1)
        s.add_argument("--device", default=None)
        s.add_argument("--dtype", default=None)
        s.add_argument("--out", default="out.png", help="output PNG; batches get -1, -2, ... suffixes")
        if task == "txt2img":
            s.add_argument("--refiner", default=None, help="an SDXL refiner (folder, hub id or file) for the last steps")
            s.add_argument("--refiner-switch-at", type=float, default=0.8, help="fraction of the steps before the refiner")
        if task == "img2img":
            s.add_argument("--image", required=True)
            s.add_argument("--strength", type=float, default=0.75)
    return p


def _out_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix or '.png'}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import ldm
    from tqdm import tqdm

    from .metadata import save_png

    settings = dict(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps, sampler=args.sampler,
                    schedule=args.schedule, guidance_scale=args.cfg_scale, width=args.width, height=args.height,
                    batch_size=args.batch_size, clip_skip=args.clip_skip)
    try:
        pipe = ldm.load(args.model, device=args.device, dtype=args.dtype)
        bar = tqdm(total=None, unit="step", file=sys.stderr)

        def progress(step: int, total: int, _latents) -> None:
            bar.total = total
            bar.update(step - bar.n)

        if args.task == "txt2img":
            if args.refiner:
                settings.update(refiner=ldm.load(args.refiner, device=args.device, dtype=args.dtype),
                                refiner_switch_at=args.refiner_switch_at)
            result = pipe.txt2img(args.prompt, callback=progress, **settings)
        else:
            result = pipe.img2img(args.image, args.prompt, strength=args.strength, callback=progress, **settings)
        bar.close()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for image, info, path in zip(result.images, result.infotexts, _out_paths(Path(args.out), len(result.images))):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, info)
        print(path)
    print(f"seeds: {', '.join(map(str, result.seeds))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
