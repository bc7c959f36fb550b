"""Request and response bodies of the A1111-compatible API, shaped as AUTOMATIC1111's
`modules/api/models.py`: the same field names and defaults, unknown keys ignored (clients send the
fields of newer A1111 versions and of extensions). Only pydantic's type checks happen here; what the
values mean for this model (sizes, samplers, ranges) is checked by `ui.sdapi.convert` with ldm.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerationRequest(Lenient):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing fields)."""

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1  # variation seeds are not supported: ignored, with a note in info
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="pixels; default: the model's native size (txt2img) or the image's (img2img)")
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = Field(
        None, description="per-request options; honoured: CLIP_stop_at_last_layers, sd_model_checkpoint (the loaded one)")
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    refiner_checkpoint: str | None = Field(None, description="SDXL: a checkpoint from /sd-models (name, title or hash) "
                                           "that runs the steps after refiner_switch_at; None or \"None\": off")
    refiner_switch_at: float | None = Field(None, description="fraction of the steps before the refiner takes over (default 0.8)")


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = Field(None, description="base64 PNG/JPEG/WebP, or data: URLs; http(s) URLs are refused")
    resize_mode: int = Field(0, description="0 (just resize) only")
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 or data: URL; white = repaint (inpaint)")
    mask_blur: int | None = 4
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int = Field(0, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="True: only the masked area (cropped, with padding)")
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


class JobRequest(Lenient):
    """POST /api/v1/jobs: a txt2img or img2img body plus "task"."""

    model_config = ConfigDict(extra="allow")
    task: str = Field("txt2img", description="txt2img or img2img (img2img with a mask inpaints)")


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its `parameters` infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seed, all_seeds, infotexts, ...")


class PngInfoRequest(Lenient):
    image: str = Field(description="base64 or data: URL")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ExtraSingleImageRequest(Lenient):
    image: str = Field(description="base64 or data: URL")
    resize_mode: int = Field(0, description="0 (scale by upscaling_resize) only")
    upscaling_resize: float = 2.0
    upscaler_1: str | None = Field("None", description="a resampler from /upscalers (None = Lanczos)")
    show_extras_results: bool = True


class ExtraSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = ""
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class JobCreated(BaseModel):
    id: str
