"""Speed and memory options chosen once at load time: attention backend, channels_last, torch.compile,
and CPU offload for small GPUs. The choices come from `ldm.Options`;
what was applied is recorded on the Pipeline (`pipe.accel`).

On a CPU-only machine all of these are either the default (sdpa attention) or a no-op with a log
message, so they can be passed unconditionally by an app that serves both.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .components import ModelKind
from .resident import keep_resident, mapped_file_ranges  # noqa: F401  (mapped_file_ranges: public here too)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accel:
    """What was actually applied (which may differ from what was asked, e.g. offload on a CPU)."""

    device: torch.device  # where the maths runs; with offload the weights rest in CPU memory
    attention: str = "sdpa"
    channels_last: bool = False
    compiled: bool = False
    offload: str = "none"


def weights_device(device: torch.device, offload: str) -> torch.device:
    """Where load_components should put the weights: offloaded models start in CPU memory."""
    return torch.device("cpu") if offload != "none" and device.type == "cuda" else device


# ---- attention ---------------------------------------------------------------------------------


def xformers_works(device: torch.device) -> bool:
    """xformers is importable and one tiny attention call succeeds on `device` (catches wheels
    built for another torch/CUDA, which import fine and fail on first use)."""
    try:
        import xformers.ops
    except Exception:  # ImportError, or a broken binary raising anything at import
        return False
    try:
        q = torch.randn(1, 8, 1, 64, device=device, dtype=torch.float16)  # [batch, tokens, heads, dim]
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception as exc:
        log.warning("xformers is installed but does not run here (%s); using PyTorch SDPA", exc)
        return False


def select_attention(requested: str, device: torch.device, probe: Callable[[torch.device], bool] = xformers_works,
                     unet_dtype: torch.dtype = torch.float32) -> str:
    """"auto": xformers on CUDA when it works; on a CPU with a bf16 U-Net, "chunked" (below); else
    PyTorch's scaled_dot_product_attention. "sdpa" and "chunked" run on any device."""
    if requested in ("sdpa", "chunked"):
        return requested
    if device.type != "cuda":
        if requested == "xformers":
            raise ValueError("attention='xformers' needs a CUDA device; use 'sdpa' or 'auto'")
        return "chunked" if device.type == "cpu" and unet_dtype == torch.bfloat16 else "sdpa"
    if probe(device):
        return "xformers"
    if requested == "xformers":
        raise ValueError("attention='xformers' was asked for but xformers is not installed or does not work with this torch/CUDA")
    return "sdpa"


def apply_attention(unet, vae, backend: str) -> None:
    # diffusers' default processors already call F.scaled_dot_product_attention: "sdpa" needs nothing.
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    elif backend == "chunked":
        for module in unet.modules():
            if _plain_attention(module):
                module.set_processor(ChunkedAttention())


def _plain_attention(module) -> bool:
    """A diffusers Attention without the extras ChunkedAttention does not implement (SD U-Nets' are plain)."""
    return (type(module).__name__ == "Attention" and hasattr(module, "set_processor")
            and module.spatial_norm is None and module.group_norm is None and module.norm_cross is None
            and module.norm_q is None and module.norm_k is None and not module.residual_connection
            and module.rescale_output_factor == 1.0 and not getattr(module, "is_cross_attention_with_kv_cache", False))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rows: int = 256) -> torch.Tensor:
    """softmax(q k^T * scale) v for [batch, heads, tokens, dim], one head and `rows` query rows at a time.

    Why: PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 (measured ~1.7x slower
    than this at SD's 4096-token self-attention), while bf16 matmuls run at several times the fp32
    rate. Two bf16 matmuls around an fp32 softmax, in blocks small enough for the cache
    (256 x 4096 fp32 scores = 4 MB), keep the matmuls fast and bound the memory."""
    b, h, n, d = q.shape
    q2 = (q * scale).reshape(b * h, n, d)
    kt = k.reshape(b * h, -1, d).transpose(1, 2)
    v2 = v.reshape(b * h, -1, d)
    out = q.new_empty((b * h, n, d))
    for i in range(b * h):
        for start in range(0, n, rows):
            w = torch.matmul(q2[i, start : start + rows], kt[i]).float().softmax(-1).to(q.dtype)
            torch.matmul(w, v2[i], out=out[i, start : start + rows])
    return out.view(b, h, n, d)


class ChunkedAttention:
    """diffusers attention processor using `chunked_attention`; masks go through PyTorch SDPA."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))
        if attention_mask is None:
            out = chunked_attention(q, k, v, attn.scale)
        else:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, attn.heads, -1, k.shape[2])
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


# ---- weights resident, except what the usual request never reads -------------------------------


def read_on_demand(components) -> tuple[torch.nn.Module, ...]:
    """The parts `configure` leaves as views of their memory-mapped weight files instead of copying them into
    private memory (ldm.resident): what the model's usual request never reads. A private copy would hold them in
    every process's RSS; mapped, the request that needs them reads them from the page cache, or after an idle
    page-out from the disk, on first use.

    - The VAE's encoder and quant_conv (image -> latents; ~0.13 GB in fp32 for SD's VAE): txt2img, hires fix's
      latent upscalers, the x4 upscaler and a refiner never read them (diffusers never pages them in for txt2img
      either); img2img and hires fix's pixel upscalers read them once per request. Kept resident for an inpainting
      model, whose every request encodes the masked image.
    - Not listed here because the rule is per table, in every module: vocabulary-sized embeddings
      (ldm.resident.sparse_tables), of which a prompt reads a few rows."""
    if components.kind == ModelKind.INPAINT:
        return ()
    vae = components.vae
    return tuple(m for m in (vae.encoder, vae.quant_conv) if m is not None)  # quant_conv is optional in AutoencoderKL


# ---- layout, compile, offload ------------------------------------------------------------------


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """Default: on for CUDA (tensor-core convolutions want NHWC), off elsewhere."""
    return device.type == "cuda" if requested is None else bool(requested)


def compile_unet(unet) -> None:
    """Compile the U-Net's forward in place. dynamic=False: one graph per input shape, compiled
    on first use of that shape (see `warmup`), never again for it."""
    unet.compile(dynamic=False)


def apply_offload(components, mode: str, device: torch.device) -> str:
    """Keep weights in CPU memory and move them to the GPU only while used. "model": whole
    component at a time (small slowdown); "sequential": one layer at a time (slow, least memory)."""
    if mode == "none":
        return "none"
    if device.type != "cuda":
        log.warning("offload=%r does nothing on %s: the weights already live in main memory", mode, device.type)
        return "none"
    from accelerate import cpu_offload, cpu_offload_with_hook

    encoders = (components.text_encoder, components.text_encoder_2)  # SDXL has a second one
    order = (*(e for e in encoders if e is not None), components.unet, components.vae)  # the order a generation uses them
    if mode == "model":
        hook = None
        for module in order:
            # Each hook moves the previous module back to the CPU when the next one starts.
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
    else:
        for module in order:
            cpu_offload(module, execution_device=device)
    return mode


def configure(components, *, device: torch.device, attention: str = "auto", compile: bool = False,
              offload: str = "none", channels_last: bool | None = None) -> Accel:
    """Apply validated options (ldm.Options) to loaded components (already on `weights_device(device, offload)`)."""
    if weights_device(device, offload).type == "cpu":
        modules = (components.text_encoder, components.text_encoder_2, components.unet, components.vae)
        copied = keep_resident(modules, leave_mapped=read_on_demand(components))
        log.info("copied %.2f GB of memory-mapped weights into RAM", copied / 1024**3)
    backend = select_attention(attention, device, unet_dtype=components.unet.dtype)
    apply_attention(components.unet, components.vae, backend)
    nhwc = use_channels_last(channels_last, device)
    if nhwc:
        components.unet.to(memory_format=torch.channels_last)
    offload = apply_offload(components, offload, device)
    if compile:
        compile_unet(components.unet)
    return Accel(device=device, attention=backend, channels_last=nhwc, compiled=bool(compile), offload=offload)
