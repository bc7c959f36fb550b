"""Command line: ``python -m ldm_tools.train demo --out weights/demo [--resume]``."""

from __future__ import annotations

import argparse
import dataclasses


def main(argv=None) -> None:
    from .demo import DemoConfig, export_checkpoint, train_demo

    p = argparse.ArgumentParser(prog="python -m ldm_tools.train")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train the bundled demo model on the shapes world")
    d.add_argument("--out", default="weights/demo")
    d.add_argument("--work-dir", default="runs/demo", help="checkpoints and logs (outside git)")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    d.add_argument("--export-only", action="store_true",
                   help="export the EMA weights of the latest checkpoint in --work-dir and exit")
    d.add_argument("--seed", type=int, default=DemoConfig.seed)
    d.add_argument("--unet-steps", type=int, default=DemoConfig.unet_steps)
    d.add_argument("--unet-minutes", type=float, default=DemoConfig.unet_minutes,
                   help="also stop the U-Net stage after this many minutes (0 = no limit)")
    d.add_argument("--vae-steps", type=int, default=DemoConfig.vae_steps)
    d.add_argument("--decoder-steps", type=int, default=DemoConfig.decoder_steps)
    d.add_argument("--n-images", type=int, default=DemoConfig.n_images)
    d.add_argument("--batch", type=int, default=DemoConfig.batch)
    a = p.parse_args(argv)
    if a.cmd == "demo":
        if a.export_only:
            export_checkpoint(a.out, a.work_dir)
            return
        cfg = dataclasses.replace(DemoConfig(), seed=a.seed, unet_steps=a.unet_steps, unet_minutes=a.unet_minutes, vae_steps=a.vae_steps, decoder_steps=a.decoder_steps,
                                  n_images=a.n_images, batch=a.batch)
        train_demo(a.out, a.work_dir, cfg, resume=a.resume)


if __name__ == "__main__":
    main()
