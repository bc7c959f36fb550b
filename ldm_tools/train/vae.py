"""Fine-tune the demo VAE's decoder against the stray blob ("speck", issue 21 item 1).

    python -m ldm_tools.train vae-decoder [--out weights/demo/vae] [--steps N] [--minutes M] [--resume]

By default only the decoder (and post_quant_conv) train; the encoder is frozen, so the latent space, and with it
the demo U-Net and every add-on trained on its latents (LoRA, ControlNet, inpainting, x4), stays valid.
`encoder_lr` > 0 trains the encoder too; the latent space then moves and all of those must be retrained.

What rounds 4-5 took for the cause: the frozen encoder writes an object's edge as an overshoot in latent
channel 2 (background about +1.3, object about -2, the edge cells +2 to +2.5 or below -3), and the decoder
paints some of those edge codes as a third colour (the blob's error gradient points at that cell and channel).
Round 6 showed that overshoot is a symptom: an encoder trained without it (`overshoot_weight`) still gets the
blob. The cause is the VAE's GroupNorm with one channel per group (16 groups on the first level's 16
channels): it maps every flat colour to the same zero, so the network keeps colours by painting a small bright
spot into its features, against whose statistics flat areas are normalised (StyleGAN2's "droplet"), and the
spot shows. A VAE with one group (`python -m ldm_tools.train demo --vae-norm-groups 1`) has no blob, but it is a
new latent space. What the shipped demo VAE is (round 7): `--norm-groups 1`, the same VAE rebuilt with one group
per GroupNorm (`regroup`: same tensors, other normalisation) whose encoder is trained back onto the starting
encoder's latents (`latent_anchor` only) while the decoder learns to decode those latents, so the latent space,
the U-Net and every add-on stay. The loss terms below are the decoder-side fixes tried before the cause was known;
they stay in the loss.

So the decoder learns those codes properly, against targets that hold no speck and keep every other pixel:
(a) world renders through the frozen encoder (plus latent noise): the true render, with the speck pixels
of the current output (off the background-object segment, and their neighbours) weighted up;
(b) latents the demo U-Net generated for training-combination prompts (seeds apart from the evaluation's):
the starting decoder's own output (distillation: its colours and sharpness stay), except that pixels off the
segment between the image's background and object colours (`world.classify` on that output), and their
neighbours, are moved onto it (their nearest blend of the two colours), weighted up.
An earlier loss that only penalised every pixel's distance from that segment (commit 36a17dd) lowered the
counted rate by paling the blob and washing out every colour; anchoring to the truth and to the starting
output is what keeps the colours.

More capacity (`layers_per_block` above the loaded VAE's, `deepen`): the same VAE with more ResNets per
block, the added ones starting as the identity, so step 0 decodes exactly as the starting decoder and the
encoder's latents stay bit-identical (its added ResNets stay the identity: only the decoder trains). The
added decoder ResNets train at `lr_new`, the starting layers at `lr`.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

from . import finetune as F
from . import world as W

PALETTE = torch.tensor([W.PALETTE[c] for c in W.COLOURS], dtype=torch.float32) / 127.5 - 1  # (8, 3) in [-1, 1]


@dataclass(frozen=True)
class DecoderConfig:
    seed: int = 0
    n_images: int = 8000  # world renders (training combinations)
    n_generated: int = 384  # U-Net latents for training prompts (the last `n_monitor` only monitor progress)
    n_monitor: int = 64
    steps: int = 1500
    minutes: float = 0.0
    batch: int = 32
    gen_batch: int = 16  # generated latents per step, next to the renders
    lr: float = 5e-4
    latent_noise: float = 0.1  # scaled-latent units: robustness to latents a little off the encoder's
    warmup: int = 50  # steps of linear lr warm-up: Adam's first full-size steps set the decoder back (3 steps
    # at 5e-4 took the monitor round trips from 25.9 to 19.9 dB)
    # A blob is a few pixels of 4096: averaged plainly their error is lost next to the rest. Pixels farther than
    # `repair_margin` from the image's background-object colour segment (in [-1, 1] units: 0.3 = 38/255; the
    # counter's threshold is 60/255, so this also takes pale blobs), with their 8 neighbours, are specks:
    # on renders their error against the render counts `hard_weight` times more (found on the current
    # output); on generated latents the starting decoder's specks are moved onto the segment in the target
    # and count `repair_weight` times more.
    repair_margin: float = 0.3
    hard_weight: float = 30.0
    repair_weight: float = 30.0
    anchor_weight: float = 1.0
    gen_seed: int = 100_000  # the speck evaluation uses seeds 0..199
    layers_per_block: int = 0  # > the loaded VAE's: `deepen` it to this (0: as loaded)
    lr_new: float = 1e-3  # the ResNets `deepen` added (they start as the identity)
    monitor_every: int = 250
    # > 0: the encoder trains too (at this lr), so that it can stop writing an object's edge as an overshoot,
    # the speck's cause; the latent space then moves and the U-Net and every add-on must be retrained on it.
    # `latent_anchor` weighs the mean squared distance (scaled units) of its latents from the starting
    # encoder's, so that only what the loss needs moves (the edges) and the retraining starts close.
    encoder_lr: float = 0.0
    latent_anchor: float = 1.0
    # The speck's cause itself, when the encoder trains: the mean squared excess of each latent cell beyond the
    # range between the render's flat background and object codes (per channel), times this weight.
    overshoot_weight: float = 0.0
    # > 0 and not the loaded VAE's: the VAE rebuilt with this many GroupNorm groups (`regroup`; 1 removes the
    # speck's cause) keeping the latent space: the encoder learns only to reproduce the starting encoder's
    # latents (`latent_anchor`, needs `encoder_lr`), the decoder learns to decode those cached latents, so the
    # demo U-Net and every add-on stay valid.
    norm_groups: int = 0
    # This share of the renders drawn in the demo LoRA's rim style (`world.rim_width`): the decoder then learns the
    # latents that style's LoRA generates too, not only solid shapes (the monitor renders stay solid).
    rim_share: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.rim_share < 1:
            raise ValueError("rim_share must be in [0, 1)")
        if self.norm_groups < 0:
            raise ValueError("norm_groups must be >= 0")
        if self.norm_groups and not (self.encoder_lr > 0 and self.latent_anchor > 0):
            raise ValueError("norm_groups needs encoder_lr > 0 and latent_anchor > 0: the encoder must learn "
                             "the starting latents again under the new normalisation")


def overshoot(z: torch.Tensor, x: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Per latent element of z (N, C, h, w): how far it lies beyond the range between the median codes of the
    cells wholly in the background and wholly in the object of renders x (N, 3, H, W) in [-1, 1], whose
    background colours are bg (N, 3) (medians: the overshoot itself must not move the range). 0 for images
    without a whole object cell."""
    obj = (x - bg[:, :, None, None]).abs().amax(1) > 0.02
    share = TF.adaptive_avg_pool2d(obj[:, None].float(), z.shape[-2:])[:, 0]
    out = torch.zeros_like(z)
    for n, (zn, s) in enumerate(zip(z, share)):
        inside, outside = s > 0.99, s < 0.01
        if not inside.any() or not outside.any():
            continue
        a, b = zn[:, inside].median(1).values.detach(), zn[:, outside].median(1).values.detach()
        lo, hi = torch.minimum(a, b)[:, None, None], torch.maximum(a, b)[:, None, None]
        out[n] = (zn - hi).clamp_min(0) + (lo - zn).clamp_min(0)
    return out


def deepen(vae, layers_per_block: int):
    """A copy of AutoencoderKL `vae` with `layers_per_block` ResNets per encoder block (the decoder has one more
    per block, from the same field) that encodes and decodes exactly as `vae`: every tensor of `vae` is copied
    to the same name (the added ResNets come after the existing ones in each block), and each added ResNet has
    conv2 weight and bias zero. ResnetBlock2D returns (input + conv2(...)) / output_scale_factor, which is 1
    here, and an added ResNet keeps its block's channel count (no shortcut conv), so it returns its input."""
    from diffusers import AutoencoderKL

    if layers_per_block <= vae.config.layers_per_block:
        return vae
    new = AutoencoderKL.from_config({**dict(vae.config), "layers_per_block": layers_per_block})
    state, old = new.state_dict(), vae.state_dict()
    assert old.keys() <= state.keys()
    for k in state.keys() - old.keys():
        assert ".resnets." in k, k
        if ".conv2." in k:
            state[k] = torch.zeros_like(state[k])
    n = vae.config.layers_per_block
    added = [r for b in new.encoder.down_blocks for r in b.resnets[n:]] + added_resnets(new, n)
    assert all(r.output_scale_factor == 1.0 and r.conv_shortcut is None for r in added)
    new.load_state_dict({**state, **old})
    return new.eval().requires_grad_(False)


def regroup(vae, groups: int):
    """A copy of AutoencoderKL `vae` whose GroupNorms have `groups` groups, with the same tensors (GroupNorm's
    affine weights are per channel, so every shape is unchanged). Not the same function: each norm now
    averages over its groups' channels together; training has to adapt it."""
    from diffusers import AutoencoderKL

    if groups in (0, vae.config.norm_num_groups):
        return vae
    new = AutoencoderKL.from_config({**dict(vae.config), "norm_num_groups": groups})
    new.load_state_dict(vae.state_dict())
    return new.eval().requires_grad_(False)


def added_resnets(vae, start_layers: int) -> list:
    """The decoder ResNets beyond those of a VAE with `start_layers` layers per block (`deepen` added them)."""
    return [r for b in vae.decoder.up_blocks for r in b.resnets[start_layers + 1:]]


def segment_projection(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each pixel of images x (N, 3, H, W) moved to its nearest point on the colour segment a-b ((N, 3) each)."""
    a, b = a[:, :, None, None], b[:, :, None, None]
    d = b - a
    t = ((x - a) * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True).clamp_min(1e-6)
    return a + t.clamp(0, 1) * d


def segment_distance(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel distance of images x (N, 3, H, W) in [-1, 1] from the colour segment a-b ((N, 3) each)."""
    return (x - segment_projection(x, a, b)).norm(dim=1)


@torch.no_grad()
def repaired_targets(img: torch.Tensor, a: torch.Tensor, b: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, repaired mask (N, 1, H, W)) for decoded images img in [-1, 1]: the pixels farther than `margin`
    from the a-b segment, grown by one pixel, moved onto the segment; every other pixel as it was."""
    off = (segment_distance(img, a, b) > margin).float()[:, None]
    grown = TF.max_pool2d(off, 3, stride=1, padding=1) > 0
    return torch.where(grown, segment_projection(img, a, b), img), grown


@torch.no_grad()
def generate_latents(model: str, combos: list, n: int, seed: int) -> tuple[torch.Tensor, list]:
    """n scaled latents from the demo U-Net (Euler 20 steps, guidance 7.5, as the evaluation), 4 seeds per
    prompt, and each one's combination."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    out, used = [], []
    for i in range(0, n, 4):
        c = rng.choice(combos)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(4)]
        out.append(pipe(W.caption(*c), num_images_per_prompt=4, generator=gens, num_inference_steps=20,
                        guidance_scale=7.5, height=64, width=64, output_type="latent").images)
        used += [c] * 4
    return torch.cat(out)[:n], used[:n]


@torch.no_grad()
def decode_u8(vae, scaled: torch.Tensor) -> np.ndarray:
    out = [vae.decode(scaled[i:i + 64].float() / vae.config.scaling_factor).sample for i in range(0, len(scaled), 64)]
    return ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def render_mix(n: int, rim_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n training renders and their combination indices: round(n * rim_share) in the demo LoRA's rim style
    first, so that the last ones, which only monitor, are solid shapes."""
    n_rims = round(n * rim_share)
    images, idx = F.render_set(n - n_rims, seed + 7)
    if not n_rims:
        return images, idx
    rims, rim_idx = F.render_set(n_rims, seed + 11, outline=W.rim_width)
    return np.concatenate([rims, images]), np.concatenate([rim_idx, idx])


def make_data(cfg: DecoderConfig, parts: F.DemoParts, model: str) -> dict:
    combos = W.train_combos()
    images, idx = render_mix(cfg.n_images, cfg.rim_share, cfg.seed)
    cols = {c: i for i, c in enumerate(W.COLOURS)}
    gen_lat, _ = generate_latents(model, combos, cfg.n_generated, cfg.gen_seed)
    # the two colours each generated image actually holds, read on the shipped decoder's output
    ks = [W.classify(im) for im in decode_u8(parts.vae, gen_lat)]
    return {"images": torch.from_numpy(images), "latents": F.encode(parts.vae, images),
            "pair": torch.tensor([[cols[combos[i][2]], cols[combos[i][0]]] for i in idx]),
            "gen_latents": gen_lat.half(),
            "gen_pair": torch.tensor([[cols[k.bg], cols[k.obj if k.obj is not None else k.bg]] for k in ks])}


@torch.no_grad()
def encode_scaled(vae, images_u8: torch.Tensor) -> torch.Tensor:
    """Scaled latent means of uint8 images (N, H, W, 3), as the U-Net sees them."""
    out = [vae.encode(F.to_unit(images_u8[i:i + 64])).latent_dist.mean for i in range(0, len(images_u8), 64)]
    return torch.cat(out) * vae.config.scaling_factor


def speck_rates(vae, data: dict, n: int, reencode: bool = False) -> dict:
    """On the last n renders through the VAE and the last n generated latents (the monitor sets): the
    fraction of images with a speck, the round trips' PSNR against the renders (a rate bought by blurring
    shows here) and the colour error of both (washed-out or tinted colours show here). `reencode`: the
    round trips go through the current encoder (when it trains), not the cached starting latents."""
    from ..eval.speck import colour_error, has_speck  # the evaluator's own definitions

    lat = encode_scaled(vae, data["images"][-n:]) if reencode else data["latents"][-n:]
    rt = decode_u8(vae, lat)
    gen = decode_u8(vae, data["gen_latents"][-n:])
    mse = np.mean((rt.astype(np.float64) - data["images"][-n:].numpy()) ** 2)
    return {"specks_roundtrip": float(np.mean([has_speck(im) for im in rt])),
            "specks_generated": float(np.mean([has_speck(im) for im in gen])),
            "roundtrip_psnr": float(10 * np.log10(255 ** 2 / mse)),
            "colour_error_roundtrip": colour_error(rt), "colour_error_generated": colour_error(gen)}


def monitor_line(r: dict) -> str:
    return ("specks renders-through-VAE / generated (monitor sets) %.3f / %.3f, round-trip PSNR %.2f dB, colour "
            "error %.1f / %.1f" % (r["specks_roundtrip"], r["specks_generated"], r["roundtrip_psnr"],
                                   r["colour_error_roundtrip"], r["colour_error_generated"]))


@torch.no_grad()
def make_targets(vae, data: dict, cfg: DecoderConfig) -> dict:
    """The starting decoder's output for every generated latent, with its specks repaired (`repaired_targets`)."""
    scale = vae.config.scaling_factor
    lat, pair = data["gen_latents"], data["gen_pair"]
    out, masks = [], []
    for i in range(0, len(lat), 64):
        img = vae.decode(lat[i:i + 64].float() / scale).sample.clamp(-1, 1)
        p = pair[i:i + 64]
        t, m = repaired_targets(img, PALETTE[p[:, 0]], PALETTE[p[:, 1]], cfg.repair_margin)
        out.append(t)
        masks.append(m)
    return {"gen_target": torch.cat(out).half(), "gen_repaired": torch.cat(masks)}


def train_decoder(out: str | Path = "weights/demo/vae", work_dir: str | Path = "runs/vae-decoder",
                  cfg: DecoderConfig | None = None, model: str = "weights/demo", resume: bool = False,
                  export_only: bool = False) -> dict:
    cfg = cfg or DecoderConfig()
    cfg.validate()
    work, parts = F.start_work(work_dir, resume, cfg.seed, model)
    data = F.cached(work / "data.pt", lambda: make_data(cfg, parts, model))
    vae = parts.vae
    # from the decoder the run starts with (cached: on --resume `model` may already hold this run's output)
    data.update(F.cached(work / "targets.pt", lambda: make_targets(vae, data, cfg)))
    start = F.cached(work / "start.pt", lambda: {"layers_per_block": vae.config.layers_per_block})
    vae = regroup(deepen(vae, cfg.layers_per_block), cfg.norm_groups)
    scale = vae.config.scaling_factor
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    enc_params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters()) if cfg.encoder_lr else []
    for p in params + enc_params:
        p.requires_grad_(True)
    new = {id(p) for r in added_resnets(vae, start["layers_per_block"]) for p in r.parameters()}
    groups = [{"params": [p for p in params if id(p) not in new], "lr": cfg.lr}]
    if new:
        groups.append({"params": [p for p in params if id(p) in new], "lr": cfg.lr_new})
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.encoder_lr})
    base_lr = [g["lr"] for g in groups]  # the warm-up scales these each step (also after --resume)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    n_train = len(data["images"]) - cfg.n_monitor  # the last n_monitor renders and latents only monitor
    n_gen = len(data["gen_latents"]) - cfg.n_monitor
    if not resume:
        F.log(work, "decoder: before: " + monitor_line(speck_rates(vae, data, cfg.n_monitor, enc_params != [])))

    def step(i: int) -> torch.Tensor:
        vae.train()
        for group, lr in zip(opt.param_groups, base_lr):
            group["lr"] = lr * min(1.0, (i + 1) / cfg.warmup)
        idx = torch.randint(0, n_train, (cfg.batch,), generator=gen)
        x = F.to_unit(data["images"][idx])
        z = data["latents"][idx].float()
        anchor = 0.0
        if enc_params:  # this encoder's latents, kept near the starting ones
            start_z, z = z, vae.encode(x).latent_dist.mean * scale
            anchor = cfg.latent_anchor * TF.mse_loss(z, start_z)
            if cfg.overshoot_weight:
                anchor = anchor + cfg.overshoot_weight * overshoot(z, x, PALETTE[data["pair"][idx][:, 0]]).pow(2).mean()
            if cfg.norm_groups:  # the latent space stays: the decoder learns the starting latents
                z = start_z
        z = z + cfg.latent_noise * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z / scale).sample
        pair = data["pair"][idx]
        spots = repaired_targets(rec.detach(), PALETTE[pair[:, 0]], PALETTE[pair[:, 1]], cfg.repair_margin)[1]
        w = 1 + cfg.hard_weight * spots.float()
        loss = TF.mse_loss(rec, x) + (w * (rec - x).abs()).mean() + anchor
        if cfg.anchor_weight:
            g = torch.randint(0, n_gen, (cfg.gen_batch,), generator=gen)
            img = vae.decode(data["gen_latents"][g].float() / scale).sample
            w = 1 + cfg.repair_weight * data["gen_repaired"][g].float()
            loss = loss + cfg.anchor_weight * (w * (img - data["gen_target"][g].float()).abs()).mean()
        if (i + 1) % cfg.monitor_every == 0:
            with torch.no_grad():
                vae.eval()
                F.log(work, f"decoder step {i + 1}: " + monitor_line(speck_rates(vae, data, cfg.n_monitor,
                                                                                  enc_params != [])))
        return loss

    modules = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    if enc_params:
        modules.update(encoder=vae.encoder, quant_conv=vae.quant_conv)
    if export_only:
        ck = torch.load(work / "decoder_ckpt.pt", weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        res = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1)}
    else:
        res = F.train_steps(work, "decoder", cfg.steps, cfg.minutes, modules, opt, gen, step)
    vae.eval().requires_grad_(False)
    res.update(speck_rates(vae, data, cfg.n_monitor, enc_params != []))
    save(Path(out), vae, cfg, res)
    F.log(work, f"decoder: wrote {out}: {json.dumps(res)}")
    return res


def save(out: Path, vae, cfg: DecoderConfig, res: dict) -> None:
    """The whole VAE (the encoder unchanged unless `encoder_lr`) as a diffusers folder; the config is the one it was loaded with."""
    vae.save_pretrained(out, safe_serialization=True)
    conf = json.loads((out / "config.json").read_text())
    conf.pop("_name_or_path", None)  # where it was loaded from this time: not part of the model
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "decoder_training.json").write_text(json.dumps({"config": asdict(cfg), **res}, indent=1) + "\n")
