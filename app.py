"""Web UI: `python app.py` -> http://127.0.0.1:7860

Flags parse first, then the pipelines load once, the UI is built and launched. The flags' choices
are ldm's own lists (`ldm.ATTENTION`, `ldm.OFFLOAD`), and the model options go to `ldm.load` as one
`ldm.Options`.
Every flag also reads a default from an environment variable LDM_<FLAG> (LDM_MODEL, LDM_AUTH,
LDM_HOST, ...), which is how the Docker image is configured.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

import ldm
from scaleout.config import PlacementError, ScaleOut, keep_local_ray_on_loopback, parse_autoscale
from ui import state
from ui.backend import BACKENDS
from ui.tempfiles import private_temp_dir, start_sweeper

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "weights" / "demo"
DEMO_ADDONS = ROOT / "weights" / "demo-models"  # LoRA/ControlNet made for the demo model, A1111 layout
DEMO_UPSCALER = ROOT / "weights" / "demo-upscaler"  # an x4 upscaler made for the demo VAE
DEMO_INPAINT = ROOT / "weights" / "demo-inpaint"  # a 9-channel inpainting model made from the demo U-Net
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def env(name: str, default=None):
    return os.environ.get(f"LDM_{name}", default)


def env_flag(name: str) -> bool:
    return env(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Text-to-image web UI (ldm + Gradio).")
    p.add_argument("--model", default=env("MODEL", str(DEFAULT_MODEL)),
                   help="diffusers folder, single file, hub id, or a checkpoint name from --models-dir (default: weights/demo)")
    p.add_argument("--inpaint-model", default=env("INPAINT_MODEL"),
                   help="optional 9-channel inpainting model (with the demo model: weights/demo-inpaint when there; '' for none)")
    p.add_argument("--upscale-model", default=env("UPSCALE_MODEL"),
                   help="optional x4 upscaler model (with the demo model: weights/demo-upscaler when there; '' for none)")
    p.add_argument("--models-dir", default=env("MODELS_DIR", "models"),
                   help="A1111/ComfyUI-style models folder: Stable-diffusion/, Lora/, VAE/, embeddings/, ... (default models/; created if missing)")
    p.add_argument("--max-loaded-models", type=int, default=int(env("MAX_LOADED_MODELS", 1)),
                   help="checkpoints kept in memory when switching (default 1: the old one is released before the next loads)")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("PORT", 7860)))
    p.add_argument("--device", default=env("DEVICE"), help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=env("DTYPE"), help="auto, float32, float16, bfloat16 (default auto: fp16 on cuda; bf16 U-Net + fp32 VAE on CPUs with native bf16; else fp32)")
    p.add_argument("--attention", choices=ldm.ATTENTION, default=env("ATTENTION", "auto"),
                   help="attention kernel: auto = xformers on CUDA when it works, chunked for a bf16 U-Net on CPU, else sdpa")
    p.add_argument("--offload", choices=ldm.OFFLOAD, default=env("OFFLOAD", "none"),
                   help="GPU only: move idle parts to the CPU to save VRAM")
    p.add_argument("--openvino", action="store_true", default=env_flag("OPENVINO"),
                   help="CPU: U-Net and VAE decoder through OpenVINO (pip install openvino; float32; converted on first use "
                        "and cached; a second copy of the weights in memory; see docs/performance.md)")
    p.add_argument("--openvino-cache", default=env("OPENVINO_CACHE"),
                   help="folder for the converted OpenVINO models (default ~/.cache/ldm/openvino)")
    p.add_argument("--vae-tiling", action="store_true", default=env_flag("VAE_TILING"), help="decode large images in tiles")
    p.add_argument("--prediction-type", choices=("auto", *(t.value for t in ldm.PredictionType)),
                   default=env("PREDICTION_TYPE", "auto"),
                   help="what --model's U-Net predicts; auto reads the model (an SD 2.x single file is tested as A1111 does)")
    p.add_argument("--auth", default=env("AUTH"), help="user:pass (several: comma-separated)")
    p.add_argument("--auth-file", default=env("AUTH_FILE"), help="file with one user:pass per line")
    p.add_argument("--outputs", default=env("OUTPUTS", "outputs"), help="folder for saved images (default outputs/)")
    p.add_argument("--no-save", action="store_true", default=env_flag("NO_SAVE"), help="do not save images")
    p.add_argument("--save-format", default=env("SAVE_FORMAT", "png"), choices=["png", "jpeg", "webp"],
                   help="file format of saved images; JPEG/WebP carry the parameters in EXIF, as A1111 (default png)")
    p.add_argument("--max-size", type=int, default=int(env("MAX_SIZE", 2048)), help="largest width/height in pixels")
    p.add_argument("--max-upload-mb", type=float, default=float(env("MAX_UPLOAD_MB", 20)), help="largest upload")
    p.add_argument("--max-request-mb", type=float, default=float(env("MAX_REQUEST_MB", 64)),
                   help="largest request body, all files of an upload together (default 64)")
    p.add_argument("--max-files", type=int, default=int(env("MAX_FILES", 10)), help="most files in one upload request (default 10)")
    p.add_argument("--queue-size", type=int, default=int(env("QUEUE_SIZE", 16)), help="waiting requests before refusing")
    p.add_argument("--cache-max-age", type=float, default=float(env("CACHE_MAX_AGE", 3600)),
                   help="seconds to keep uploads and temporary results (default 3600; 0 = until exit)")
    p.add_argument("--share", action="store_true", default=env_flag("SHARE"), help="public gradio.live link (off)")
    p.add_argument("--no-api", action="store_true", default=env_flag("NO_API"),
                   help="no REST API (A1111's /sdapi/v1 and /api/v1/jobs, docs at /docs; on by default)")
    p.add_argument("--api-auth", default=env("API_AUTH"), help="user:pass for the REST API (default: the --auth users)")
    p.add_argument("--api-job-ttl", type=float, default=float(env("API_JOB_TTL", 3600)),
                   help="seconds a finished API job's results are kept (default 3600)")
    p.add_argument("--backend", choices=BACKENDS, default=env("BACKEND", "inprocess"),
                   help="where images are generated: inprocess (default) or ray (Ray Serve replicas; docs/scale-out.md)")
    p.add_argument("--replicas", type=int, default=int(env("REPLICAS")) if env("REPLICAS") else None,
                   help="--backend ray: replicas per model kind (default 1; or --autoscale)")
    p.add_argument("--autoscale", default=env("AUTOSCALE") or None, help="--backend ray: MIN:MAX replicas, scaled by Serve on load")
    p.add_argument("--ray-address", default=env("RAY_ADDRESS") or None,
                   help="--backend ray: join a cluster (auto, ray://HOST:10001); default: start a local Ray on 127.0.0.1")
    p.add_argument("--gpus-per-replica", type=float, default=float(env("GPUS_PER_REPLICA")) if env("GPUS_PER_REPLICA") else None,
                   help="--backend ray: GPUs each replica takes (default 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=float(env("CPUS_PER_REPLICA")) if env("CPUS_PER_REPLICA") else None,
                   help="--backend ray: CPUs each replica takes (default 1)")
    return p


def read_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """user:pass pairs from --auth (comma-separated) and --auth-file (one a line, # comments).

    Either flag given (even empty, e.g. LDM_AUTH="") asks for auth: if it yields no user, the app
    refuses to start rather than run open."""
    entries: list[str] = []
    if auth is not None:
        entries += auth.split(",")
    if auth_file is not None:
        entries += Path(auth_file).read_text(encoding="utf-8").splitlines()
    pairs = []
    for entry in (e.strip() for e in entries):
        if not entry or entry.startswith("#"):
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"error: auth entries must look like user:password, got {user!r}:…")
        pairs.append((user, password))
    if not pairs and (auth is not None or auth_file is not None):
        given = " and ".join(f for f, v in (("--auth", auth), (f"--auth-file {auth_file}", auth_file)) if v is not None)
        raise SystemExit(f"error: {given} names no user (expected user:password entries); refusing to start without auth")
    return pairs


def warn_if_open(host: str, auth: list, share: bool) -> None:
    if (host not in LOOPBACK or share) and not auth:
        bar = "!" * 78
        print(f"\n{bar}\n!! WARNING: listening on {host}{' with a public share link' if share else ''} WITHOUT --auth.\n"
              f"!! Anyone who can reach this address can use the app and your GPU. Set --auth user:pass\n"
              f"!! (or LDM_AUTH) unless something in front of it handles access.\n{bar}\n", file=sys.stderr, flush=True)


def model_options(args: argparse.Namespace) -> ldm.Options:
    """The flags that configure a loaded model, as the one object ldm.load takes."""
    return ldm.Options(max_size=args.max_size, vae_tiling=args.vae_tiling, attention=args.attention,
                       offload=args.offload, openvino=args.openvino, openvino_cache=args.openvino_cache).validate()


def load_model(model: str | None, args: argparse.Namespace):
    """One pipeline with the app's device, dtype and options; None for no model. A model or option
    that ldm refuses (ModelLoadError, xformers on a CPU, ...) exits with its message, not a traceback."""
    if not model:
        return None
    print(f"loading {model} ...", flush=True)
    try:
        return loader(args)(model)
    except (ValueError, ldm.OpenVINONotInstalled) as exc:
        raise SystemExit(f"error: {exc}") from None


def loader(args: argparse.Namespace):
    """model -> pipeline with the app's device, dtype, options and models folder (also what switching uses)."""
    def load(model: str):
        # --prediction-type is about --model; checkpoints switched to from the models folder decide for themselves
        prediction = args.prediction_type if model == args.model else None
        return ldm.load(model, device=args.device, dtype=args.dtype, options=model_options(args),
                        models_dir=args.models_dir, prediction_type=prediction)

    return load


def check_models_dir(args: argparse.Namespace) -> None:
    """The models folder is created with its layout when missing; one that cannot be is left out with a warning.
    The default folder also gets the demo model's add-ons (see link_demo_addons)."""
    if args.models_dir:
        try:
            ldm.Library(args.models_dir)
        except OSError as exc:
            print(f"warning: models folder {args.models_dir} unusable ({exc}); running without one", file=sys.stderr)
            args.models_dir = None
            return
        if Path(args.models_dir).resolve() == Path("models").resolve():
            link_demo_addons(args.models_dir)


def link_demo_addons(models_dir: str | os.PathLike) -> None:
    """Symlink each add-on of the demo model (weights/demo-models, A1111 layout: Lora/outline, ...) into the
    models folder unless something of that name is there, so the app lists them offline like the user's own."""
    for item in sorted(DEMO_ADDONS.glob("*/*")):
        link = Path(models_dir) / item.relative_to(DEMO_ADDONS)
        if link.exists() or link.is_symlink():
            continue
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(item.resolve(), target_is_directory=item.is_dir())
        except OSError as exc:
            print(f"warning: could not link the demo add-on {item} into {models_dir} ({exc})", file=sys.stderr)


def demo_companions(args: argparse.Namespace) -> tuple[str, ...]:
    """With the demo model, --upscale-model and --inpaint-model default to the x4 upscaler and the inpainting model
    made for it when they are there (an explicit value, "" for none, wins); other models get none unasked. (The
    inpainting model: 95.8% fully right of the 48 recolour cases of `python -m ldm_tools.eval inpaint`, the regular model 79.2%.)
    Not with --backend ray: there every model is a deployment of its own replicas, and an unasked one would
    need CPUs the cluster may not have (Serve then waits for them forever).
    Returns the kinds it chose ("inpaint", "upscale"): they serve only while the demo model does (state.Pipes.paired)."""
    if Path(args.model).resolve() != DEFAULT_MODEL.resolve() or args.backend == "ray":
        return ()
    chosen = []
    if args.upscale_model is None and DEMO_UPSCALER.is_dir():
        args.upscale_model = str(DEMO_UPSCALER)
        chosen.append("upscale")
    if args.inpaint_model is None and DEMO_INPAINT.is_dir():
        args.inpaint_model = str(DEMO_INPAINT)
        chosen.append("inpaint")
    return tuple(chosen)


def load_pipelines(args: argparse.Namespace) -> state.Pipes:
    check_models_dir(args)
    paired = demo_companions(args)
    if Path(args.model) == DEFAULT_MODEL and not DEFAULT_MODEL.exists():
        raise SystemExit(f"error: the demo model {DEFAULT_MODEL} is not there yet; pass --model")
    base = load_model(args.model, args)
    return state.Pipes(base, load_model(args.inpaint_model, args), load_model(args.upscale_model, args),
                       paired_with=str(base.name), paired=paired)


def scale_out(args: argparse.Namespace) -> ScaleOut | None:
    """--backend ray's flags as a checked ScaleOut (None in process); a mistake exits with its message."""
    given = [f"--{name.replace('_', '-')}" for name in ("replicas", "autoscale", "ray_address", "gpus_per_replica",
                                                         "cpus_per_replica") if getattr(args, name) is not None]
    if args.backend != "ray":
        if given:
            raise SystemExit(f"error: {', '.join(given)} only apply with --backend ray")
        return None
    try:
        return ScaleOut(replicas=args.replicas, autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
                        address=args.ray_address, gpus_per_replica=args.gpus_per_replica,
                        cpus_per_replica=1.0 if args.cpus_per_replica is None else args.cpus_per_replica).validate()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def start_backend(args: argparse.Namespace, scale: ScaleOut | None, device: str | None, pipes: state.Pipes):
    """The Ray Serve backend (imported only here: the default install has no Ray), or None in process."""
    if scale is None:
        return None
    if scale.address is None:
        keep_local_ray_on_loopback()  # before Ray is imported: our own Ray listens on 127.0.0.1 only
    try:
        from scaleout.backend import RayBackend
        from scaleout.replica import LoadSettings
    except ImportError as exc:
        raise SystemExit(f"error: --backend ray needs Ray Serve: pip install -r requirements-ray.txt ({exc})") from None
    settings = LoadSettings(device=device, dtype=args.dtype, options=model_options(args), models_dir=args.models_dir)
    print(f"starting Ray Serve replicas ({scale.max_replicas} per model kind) ...", flush=True)
    try:
        backend = RayBackend(scale, settings, {"base": pipes.base, "inpaint": pipes.inpaint, "upscale": pipes.upscale},
                             max_models=args.max_loaded_models)
    except PlacementError as exc:  # before deploying: replicas our own Ray cannot place
        raise SystemExit(f"error: {exc}") from None
    atexit.register(backend.close)
    print(backend.describe(), flush=True)
    return backend


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_request_mb < args.max_upload_mb or args.max_files < 1:
        raise SystemExit("error: --max-request-mb must be at least --max-upload-mb, and --max-files at least 1")
    if args.max_loaded_models < 1:
        raise SystemExit("error: --max-loaded-models must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Before gradio is imported: uploads and cached results go to a folder of this app's own.
    temp_dir = private_temp_dir()
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    auth = read_auth(args.auth, args.auth_file)
    api_auth = read_auth(args.api_auth, None)
    warn_if_open(args.host, auth, args.share)
    scale = scale_out(args)  # --backend ray: its flags are checked before any model loads
    replica_device = args.device
    if scale is not None:
        args.device = "cpu"  # the front end's copy only checks requests and draws previews; replicas generate
    pipes = load_pipelines(args)
    backend = start_backend(args, scale, replica_device, pipes)

    # Gradio is imported only now, after GRADIO_TEMP_DIR is set: it reads the variable at import.
    from ui.layout import build
    from ui.limits import LoginBackoff
    from ui.security import launch_kwargs

    backoff = LoginBackoff()  # one count of failed logins per client, for the page's login and the API's Basic auth
    outputs = None if args.no_save else Path(args.outputs).resolve()
    per_user = len({user for user, _ in auth}) > 1  # several users: each sees only their own images
    options = state.Options(outputs=outputs, max_upload_mb=args.max_upload_mb, queue_size=args.queue_size,
                            cache_max_age=args.cache_max_age, model_loader=loader(args), model_spec=args.model,
                            max_loaded_models=args.max_loaded_models,  # checkpoint switching (ui.models)
                            per_user_outputs=per_user, save_format=args.save_format)
    options.backend = backend  # None: generate in this process (ui.backend)
    demo = build(pipes, options)
    start_sweeper(temp_dir, args.cache_max_age)
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, footer_links=["api", "settings"],
        prevent_thread_lock=True,  # the REST API's routes are added to the running app, then we block
        **launch_kwargs(auth=auth, max_upload_mb=args.max_upload_mb, outputs=outputs, auth_file=args.auth_file,
                        max_request_mb=args.max_request_mb, max_files=args.max_files, login_backoff=backoff,
                        per_user=per_user),
    )
    if not args.no_api:
        mount_api(demo, args, api_auth or auth, backoff)
    try:
        demo.block_thread()
    finally:
        if backend is not None:
            backend.close()


def mount_api(demo, args: argparse.Namespace, auth: list[tuple[str, str]], backoff) -> None:
    """A1111's /sdapi/v1 and the jobs API on the UI's server, HTTP Basic with `auth` (ui.sdapi)."""
    from ui import sdapi

    secret = {"auth", "auth_file", "api_auth"}
    flags = {k: v for k, v in vars(args).items() if k not in secret}
    sdapi.mount(demo.app, demo.ldm_context, sdapi.Settings(auth=auth, job_ttl=args.api_job_ttl, cmd_flags=flags,
                                                                   backoff=backoff))


if __name__ == "__main__":
    main()
