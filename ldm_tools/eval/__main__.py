"""Command line: ``python -m ldm_tools.eval demo [--model weights/demo] [--seeds N]``; also ``lora``, ``controlnet``,
``speck`` (the demo add-ons and the stray-blob count), ``inpaint``, ``upscaler`` (see docs/demo-addons.md)."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm_tools.eval")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="evaluate the bundled demo model and write docs/demo-model.md")
    d.add_argument("--model", default="weights/demo")
    d.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    d.add_argument("--doc", default="docs/demo-model.md", help="where to write the report ('' to skip)")
    d.add_argument("--inpaint-cases", type=int, default=48)
    lo = sub.add_parser("lora", help="evaluate the demo LoRA (style rate with and without it)")
    lo.add_argument("--model", default="weights/demo")
    lo.add_argument("--lora", default="weights/demo-models/Lora/outline.safetensors")
    lo.add_argument("--prompts", type=int, default=50)
    lo.add_argument("--seeds", type=int, default=2)
    lo.add_argument("--grid", default="docs/images/demo-lora.png", help="grid image ('' to skip)")
    lo.add_argument("--seed", type=int, default=0, help="draws the cases (0: the reported set; others: fresh cases)")
    cn = sub.add_parser("controlnet", help="evaluate the demo canny ControlNet (IoU of object and control shape)")
    cn.add_argument("--model", default="weights/demo")
    cn.add_argument("--controlnet", default="weights/demo-models/ControlNet/demo-canny")
    cn.add_argument("--cases", type=int, default=50)
    cn.add_argument("--grid", default="docs/images/demo-controlnet.png", help="grid image ('' to skip)")
    sp = sub.add_parser("speck", help="fraction of images with a stray blob: renders, VAE round trips, generated")
    sp.add_argument("--model", default="weights/demo")
    sp.add_argument("--prompts", type=int, default=50)
    sp.add_argument("--seeds", type=int, default=4)
    sp.add_argument("--vae", default="", help="only the round trips of this VAE folder (+ the LoRA style's rims), "
                    "no model needed: a VAE candidate before its U-Net is trained")
    ip = sub.add_parser("inpaint", help="recolour accuracy of the demo inpainting model and of the regular demo model")
    ip.add_argument("--model", default="weights/demo-inpaint")
    ip.add_argument("--base", default="weights/demo", help="the regular model to compare with ('' to skip)")
    ip.add_argument("--cases", type=int, default=48)
    ip.add_argument("--grid", default="docs/images/demo-inpaint.png", help="grid image ('' to skip)")
    ip.add_argument("--seed", type=int, default=0, help="draws the cases (0: the reported set; others: fresh cases)")
    up = sub.add_parser("upscaler", help="the demo x4 upscaler against Lanczos and bicubic (PSNR, edge width)")
    up.add_argument("--model", default="weights/demo-upscaler")
    up.add_argument("--cases", type=int, default=50)
    up.add_argument("--guidance", type=float, default=9.0, help="the Upscale tab's default is 9 (diffusers')")
    up.add_argument("--grid", default="docs/images/demo-upscaler.png", help="grid image ('' to skip)")
    a = p.parse_args(argv)
    if a.cmd == "inpaint":
        from .inpaint import run as run_inpaint

        run_inpaint(a.model, a.base, n=a.cases, grid=a.grid or None, seed=a.seed)
        return
    if a.cmd == "upscaler":
        from .upscaler import run as run_upscaler

        run_upscaler(a.model, n=a.cases, grid=a.grid or None, guidance=a.guidance)
        return
    if a.cmd == "speck":
        from .speck import run as run_speck, vae_report

        if a.vae:
            vae_report(a.vae)
            return
        run_speck(a.model, prompts=a.prompts, seeds=a.seeds)
        return
    if a.cmd == "controlnet":
        from .controlnet import run as run_controlnet

        run_controlnet(a.model, a.controlnet, n=a.cases, grid=a.grid or None)
        return
    if a.cmd == "lora":
        from .lora import run as run_lora

        run_lora(a.model, a.lora, n=a.prompts, seeds=a.seeds, grid=a.grid or None, seed=a.seed)
        return
    if a.cmd == "demo":
        from .demo import run

        run(a.model, seeds=a.seeds, doc=a.doc or None, inpaint_n=a.inpaint_cases)


if __name__ == "__main__":
    main()
