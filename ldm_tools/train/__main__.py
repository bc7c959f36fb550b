"""Command line: ``python -m ldm_tools.train demo --out weights/demo [--resume]``, ``... lora``, ``... controlnet``,
``... vae-decoder``."""

from __future__ import annotations

import argparse
import dataclasses


def main(argv=None) -> None:
    from .demo import DemoConfig, export_checkpoint, train_demo
    from .controlnet import ControlNetConfig, train_controlnet
    from .lora import LoraConfig, train_lora
    from .inpaint import InpaintConfig, train_inpaint
    from .upscaler import UpscalerConfig, train_upscaler
    from .vae import DecoderConfig, train_decoder

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
    d.add_argument("--init-vae", default="", help="use this VAE folder instead of training one (a new VAE for a model)")
    d.add_argument("--init-model", default="", help="start the U-Net and text encoder from this model's")
    d.add_argument("--unet-lr", type=float, default=DemoConfig.unet_lr)
    d.add_argument("--text-lr", type=float, default=DemoConfig.text_lr)
    d.add_argument("--offset-noise-start", type=int, default=DemoConfig.offset_noise_start)
    d.add_argument("--vae-norm-groups", type=int, default=DemoConfig.vae_norm_groups,
                   help="GroupNorm groups in a VAE trained here (16, per channel at the first level, makes the speck)")
    d.add_argument("--vae-latent-channels", type=int, default=DemoConfig.vae_latent_channels)
    lo = sub.add_parser("lora", help="train the demo LoRA 'outline' on top of the demo model")
    lo.add_argument("--out", default="weights/demo-models/Lora/outline.safetensors")
    lo.add_argument("--work-dir", default="runs/lora")
    lo.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    lo.add_argument("--steps", type=int, default=LoraConfig.steps)
    lo.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes (0 = no limit)")
    lo.add_argument("--export-only", action="store_true", help="write --out from the checkpoint in --work-dir and exit")
    lo.add_argument("--model", default="weights/demo", help="the base model it is trained for")
    lo.add_argument("--init", default="", help="start from this LoRA file (same layers and rank) instead of zero")
    cn = sub.add_parser("controlnet", help="train the demo canny ControlNet for the demo model")
    cn.add_argument("--out", default="weights/demo-models/ControlNet/demo-canny")
    cn.add_argument("--work-dir", default="runs/controlnet")
    cn.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    cn.add_argument("--steps", type=int, default=ControlNetConfig.steps)
    cn.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes (0 = no limit)")
    cn.add_argument("--export-only", action="store_true", help="write --out from the checkpoint in --work-dir and exit")
    cn.add_argument("--model", default="weights/demo", help="the base model it is trained for")
    cn.add_argument("--init", default="", help="start from this trained add-on (a fine-tune onto a new base model)")
    vd = sub.add_parser("vae-decoder", help="fine-tune the demo VAE's decoder (and with --encoder-lr its encoder) against stray blobs")
    vd.add_argument("--out", default="weights/demo/vae")
    vd.add_argument("--model", default="weights/demo")
    vd.add_argument("--work-dir", default="runs/vae-decoder")
    vd.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    vd.add_argument("--steps", type=int, default=DecoderConfig.steps)
    vd.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes (0 = no limit)")
    vd.add_argument("--export-only", action="store_true", help="write --out from the checkpoint in --work-dir and exit")
    vd.add_argument("--layers-per-block", type=int, default=DecoderConfig.layers_per_block,
                    help="more than the loaded VAE's: add ResNets that start as the identity (0 = as loaded)")
    vd.add_argument("--lr", type=float, default=DecoderConfig.lr, help="the loaded decoder's layers")
    vd.add_argument("--lr-new", type=float, default=DecoderConfig.lr_new, help="the added ResNets")
    vd.add_argument("--speck-weight", type=float, default=DecoderConfig.hard_weight,
                    help="extra loss weight of speck pixels (renders and generated latents alike)")
    vd.add_argument("--encoder-lr", type=float, default=DecoderConfig.encoder_lr,
                    help="> 0: train the encoder too (the latent space moves: retrain the U-Net and add-ons)")
    vd.add_argument("--latent-anchor", type=float, default=DecoderConfig.latent_anchor,
                    help="weight of the encoder's latents' squared distance from the starting ones")
    vd.add_argument("--overshoot-weight", type=float, default=DecoderConfig.overshoot_weight,
                    help="with --encoder-lr: weight of the latents' excess beyond the flat codes' range at edges")
    vd.add_argument("--norm-groups", type=int, default=DecoderConfig.norm_groups,
                    help="rebuild the VAE with this many GroupNorm groups (1: no speck) keeping its latent space "
                         "(needs --encoder-lr; 0 = as loaded)")
    vd.add_argument("--rim-share", type=float, default=DecoderConfig.rim_share,
                    help="share of the renders drawn in the demo LoRA's rim style, so the decoder learns them too")
    ip = sub.add_parser("inpaint", help="train the demo 9-channel inpainting model from the demo U-Net")
    ip.add_argument("--out", default="weights/demo-inpaint")
    ip.add_argument("--work-dir", default="runs/inpaint-v2")
    ip.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    ip.add_argument("--steps", type=int, default=InpaintConfig.steps)
    ip.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes in all (0 = no limit)")
    ip.add_argument("--export-only", action="store_true", help="write --out from the checkpoint in --work-dir and exit")
    ip.add_argument("--model", default="weights/demo", help="the base model it is trained for")
    ip.add_argument("--init", default="", help="start from this trained add-on (a fine-tune onto a new base model)")
    up = sub.add_parser("upscaler", help="train the demo x4 upscaler (16 -> 64 px) from the demo U-Net")
    up.add_argument("--out", default="weights/demo-upscaler")
    up.add_argument("--work-dir", default="runs/upscaler")
    up.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    up.add_argument("--steps", type=int, default=UpscalerConfig.steps)
    up.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes in all (0 = no limit)")
    up.add_argument("--export-only", action="store_true", help="write --out from the checkpoint in --work-dir and exit")
    up.add_argument("--model", default="weights/demo", help="the base model it is trained for")
    up.add_argument("--init", default="", help="start from this trained add-on (a fine-tune onto a new base model)")
    a = p.parse_args(argv)
    if a.cmd == "upscaler":
        train_upscaler(a.out, a.work_dir, dataclasses.replace(UpscalerConfig(), steps=a.steps, minutes=a.minutes, init=a.init),
                       model=a.model,
                       resume=a.resume or a.export_only, export_only=a.export_only)
        return
    if a.cmd == "inpaint":
        train_inpaint(a.out, a.work_dir, dataclasses.replace(InpaintConfig(), steps=a.steps, minutes=a.minutes, init=a.init),
                      model=a.model,
                      resume=a.resume or a.export_only, export_only=a.export_only)
        return
    if a.cmd == "vae-decoder":
        cfg = dataclasses.replace(DecoderConfig(), steps=a.steps, minutes=a.minutes, layers_per_block=a.layers_per_block,
                                  lr=a.lr, lr_new=a.lr_new, hard_weight=a.speck_weight, repair_weight=a.speck_weight,
                                  encoder_lr=a.encoder_lr, latent_anchor=a.latent_anchor,
                                  overshoot_weight=a.overshoot_weight, norm_groups=a.norm_groups,
                                  rim_share=a.rim_share)
        train_decoder(a.out, a.work_dir, cfg,
                      model=a.model, resume=a.resume or a.export_only, export_only=a.export_only)
        return
    if a.cmd == "controlnet":
        train_controlnet(a.out, a.work_dir, dataclasses.replace(ControlNetConfig(), steps=a.steps, minutes=a.minutes, init=a.init),
                         model=a.model,
                         resume=a.resume or a.export_only, export_only=a.export_only)
        return
    if a.cmd == "lora":
        train_lora(a.out, a.work_dir, dataclasses.replace(LoraConfig(), steps=a.steps, minutes=a.minutes, init=a.init),
                   model=a.model,
                   resume=a.resume or a.export_only, export_only=a.export_only)
        return
    if a.cmd == "demo":
        if a.export_only:
            export_checkpoint(a.out, a.work_dir)
            return
        cfg = dataclasses.replace(DemoConfig(), seed=a.seed, unet_steps=a.unet_steps, unet_minutes=a.unet_minutes, vae_steps=a.vae_steps, decoder_steps=a.decoder_steps,
                                  n_images=a.n_images, batch=a.batch, init_vae=a.init_vae, init_model=a.init_model,
                                  unet_lr=a.unet_lr, text_lr=a.text_lr, offset_noise_start=a.offset_noise_start,
                                  vae_norm_groups=a.vae_norm_groups, vae_latent_channels=a.vae_latent_channels)
        train_demo(a.out, a.work_dir, cfg, resume=a.resume)


if __name__ == "__main__":
    main()
