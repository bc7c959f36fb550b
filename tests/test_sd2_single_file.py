"""SD 2.x single-file checkpoints (OpenCLIP ViT-H text encoder under `cond_stage_model.model.*`, 24 blocks
of which SD 2 uses 23): bundled configs for 512 epsilon and 768 v-prediction, A1111's v-prediction test,
the caller's override, and parity with diffusers' from_single_file on the same local config (no hub)."""
import json
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import ldm
import tiny
from ldm import ModelKind, ModelLoadError, PredictionType, single_file
from ldm.prediction import predicts_v
from pixels import gens, max_diff
from test_safety_loading import _unet_key, _vae_key
from test_sdxl_single_file import _open_clip_layout

GEN = dict(width=32, height=24, steps=3, seed=5, sampler="Euler", negative_prompt="fog")
SD2_UNET = dict(cross_attention_dim=32, use_linear_projection=True, attention_head_dim=(2, 4))


def open_clip_pair(seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """(the 23-layer text encoder SD 2 uses, the 24-layer OpenCLIP model a checkpoint file holds)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, max_position_embeddings=77,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=0, layer_norm_eps=1e-5, hidden_act="gelu")
    full = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=24, projection_dim=32, **cfg)).eval()
    used = CLIPTextModel(CLIPTextConfig(num_hidden_layers=23, **cfg)).eval()
    weights = {k.removeprefix("text_model."): v for k, v in full.state_dict().items() if k.startswith("text_model.")}
    missing, unexpected = used.load_state_dict(weights, strict=False)
    assert not missing and all(".layers.23." in k for k in unexpected)
    return used, full


def sd2_folder(folder, *, unet_model=None, prediction="epsilon", seed=0):
    used, _ = open_clip_pair(seed)
    sched = {**tiny.SD15_SCHEDULER, "prediction_type": prediction}
    tiny.save_model(folder, unet_model=unet_model or tiny.unet(seed, **SD2_UNET), text_model=used, scheduler=sched)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # OpenCLIP pads with "!" (id 0)
        config = json.loads((folder / "tokenizer" / name).read_text())
        config["pad_token"] = "!"
        (folder / "tokenizer" / name).write_text(json.dumps(config))
    return folder


def sd2_original_layout(folder, seed=0) -> dict[str, torch.Tensor]:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    out = {"model.diffusion_model." + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name = _vae_key(k, len(vae.config.block_out_channels))
        out["first_stage_model." + name] = v[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name) else v
    out.update(_open_clip_layout(open_clip_pair(seed)[1], "cond_stage_model.model."))  # all 24 blocks, as real files
    return {k: v.contiguous() for k, v in out.items()}


def config_only(folder, dest):
    """A model folder's JSON configs and tokenizer, without weights: what `config=` and the bundled folders are."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    folder = sd2_folder(root / "tiny-sd2")
    file = root / "tiny-sd2.safetensors"
    save_file(sd2_original_layout(folder), file)
    return folder, file, config_only(folder, root / "config")


@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def diffusers_from_file(file, config, seeds):
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_sd2_file_loads_to_the_folder_tensors_and_matches_diffusers(sd2, no_hub):
    folder, file, config = sd2
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in single_file.read_state_dict(file)
    ours = ldm.load(file, config=config, device="cpu", dtype="float32")
    plain = ldm.load(folder, device="cpu", dtype="float32")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours.components, part).state_dict(), getattr(plain.components, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert ours.components.text_encoder.config.num_hidden_layers == 23  # the 24th block is not used (penultimate)
    assert ours.components.tokenizer.pad_token_id == 0
    result = ours.txt2img("a red fox", **GEN)
    ref = diffusers_from_file(file, config, result.seeds)
    theirs = ref("a red fox", negative_prompt="fog", width=32, height=24, num_inference_steps=3, guidance_scale=7.0,
                 generator=gens(5, 1)).images
    print(f"sd2 epsilon file vs diffusers from_single_file: max pixel diff {max_diff(result.images, theirs)}")
    assert max_diff(result.images, theirs) <= 2


@pytest.fixture(scope="module")
def bundled_tiny(sd2, tmp_path_factory):
    """Tiny stand-ins for the bundled sd2 / sd2-v folders (the real ones need 3.5 GB of weights): same scheduler
    and size facts as ldm/configs, tiny shapes, no tokenizer (the bundled one is used, padded with "!")."""
    root = tmp_path_factory.mktemp("bundled")
    out = {}
    for name in ("sd2", "sd2-v"):
        dest = config_only(sd2[0], root / name)
        shutil.rmtree(dest / "tokenizer")
        for sub in ("unet/config.json", "scheduler/scheduler_config.json"):
            real = json.loads((single_file.BUNDLED_CONFIGS[name] / sub).read_text())
            mine = json.loads((dest / sub).read_text())
            keep = ("sample_size",) if sub.startswith("unet") else ("prediction_type", "_class_name")
            (dest / sub).write_text(json.dumps({**mine, **{k: real[k] for k in keep}}))
        out[name] = dest
    return out


def file_with_output(tmp_path, bias: float):
    """An SD 2 file whose U-Net returns `bias` everywhere: -2 reads as v-prediction in A1111's test, 0.5 as epsilon."""
    unet = tiny.unet(0, **SD2_UNET)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(bias)
    folder = sd2_folder(tmp_path / f"sd2-out{bias}", unet_model=unet)
    file = tmp_path / f"out{bias}.safetensors"
    save_file(sd2_original_layout(folder), file)
    return file


def test_a1111_output_test_tells_v_prediction_apart():
    unet = tiny.unet(0, **SD2_UNET)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-2.0)
    assert predicts_v(unet)
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.5)
    assert not predicts_v(unet)


def test_bundled_sd2_configs_follow_the_output_test_and_the_override(tmp_path, bundled_tiny, monkeypatch, no_hub):
    for name, folder in bundled_tiny.items():
        monkeypatch.setitem(single_file.BUNDLED_CONFIGS, name, folder)
    v_file, eps_file = file_with_output(tmp_path, -2.0), file_with_output(tmp_path, 0.5)
    v = ldm.load(v_file, device="cpu", dtype="float32")
    eps = ldm.load(eps_file, device="cpu", dtype="float32")
    f = v.vae_scale_factor
    assert v.scheduler_config["prediction_type"] == "v_prediction" and v.family.default_size == 96 * f
    assert eps.scheduler_config["prediction_type"] == "epsilon" and eps.family.default_size == 64 * f
    assert v.components.tokenizer.pad_token_id == 0 and v.kind is ModelKind.BASE
    # the user's word wins, and the test is then not run
    calls = []
    monkeypatch.setattr(single_file, "predicts_v", lambda unet: calls.append(1) or True)
    forced = ldm.load(v_file, device="cpu", dtype="float32", prediction_type="epsilon")
    assert forced.scheduler_config["prediction_type"] == "epsilon" and forced.family.default_size == 64 * f
    assert calls == []
    assert ldm.load(eps_file, device="cpu", dtype="float32", prediction_type=PredictionType.V_PREDICTION
                    ).scheduler_config["prediction_type"] == "v_prediction"
    # the prediction type changes the picture (same weights, same seed)
    kw = dict(GEN, width=24, height=24)
    assert max_diff(v.txt2img("a cat", **kw).images, forced.txt2img("a cat", **kw).images) > 10


def test_v_prediction_file_matches_diffusers_with_the_v_config(sd2, tmp_path, bundled_tiny, monkeypatch, no_hub):
    file = sd2[1]  # random weights: the text encoder and U-Net matter (told v, the output test is not run)
    for name, folder in bundled_tiny.items():
        monkeypatch.setitem(single_file.BUNDLED_CONFIGS, name, folder)
    ours = ldm.load(file, device="cpu", dtype="float32", prediction_type="v_prediction")
    assert ours.family.default_size == 96 * ours.vae_scale_factor
    result = ours.txt2img("a tree", **GEN)
    config = config_only(bundled_tiny["sd2-v"], tmp_path / "v-config")
    shutil.copytree(sd2[2] / "tokenizer", config / "tokenizer")  # the bundled one padded with "!", as ours
    ref = diffusers_from_file(file, config, result.seeds)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    theirs = ref("a tree", negative_prompt="fog", width=32, height=24, num_inference_steps=3, guidance_scale=7.0,
                 generator=gens(5, 1)).images
    print(f"sd2 v-prediction file vs diffusers from_single_file: max pixel diff {max_diff(result.images, theirs)}")
    assert max_diff(result.images, theirs) <= 2


def test_override_applies_to_folders_and_bad_values_fail_before_loading(sd2, tmp_path):
    folder, _, _ = sd2
    assert ldm.load(folder, device="cpu", dtype="float32", prediction_type="v_prediction"
                    ).scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of auto, epsilon, v_prediction; got 'v'"):
        ldm.load(tmp_path / "missing.safetensors", prediction_type="v")


def test_sd2_inpainting_file_is_epsilon_without_the_test(tmp_path, bundled_tiny, monkeypatch):
    for name, folder in bundled_tiny.items():
        monkeypatch.setitem(single_file.BUNDLED_CONFIGS, name, folder)
    monkeypatch.setattr(single_file, "predicts_v", lambda unet: pytest.fail("inpainting models are not tested"))
    folder = sd2_folder(tmp_path / "inpaint", unet_model=tiny.unet(0, in_channels=9, **SD2_UNET))
    file = tmp_path / "inpaint.safetensors"
    save_file(sd2_original_layout(folder), file)
    pipe = ldm.load(file, device="cpu", dtype="float32")
    assert pipe.kind is ModelKind.INPAINT and pipe.scheduler_config["prediction_type"] == "epsilon"


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_bundled_sd2_configs_have_the_real_shapes():
    """SD 2.x: U-Net 865,910,724 parameters (heads 5/10/20/20, cross-attention 1024, linear projections), the
    OpenCLIP ViT-H text model's 23 used layers 340,387,840 (1024 wide, 16 heads, gelu), SD's VAE 83,653,863."""
    folders = [single_file.BUNDLED_CONFIGS[n] for n in ("sd2", "sd2-v")]
    for folder in folders:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        assert [count(unet), count(text), count(vae)] == [865_910_724, 340_387_840, 83_653_863]
        assert (text.config.hidden_act, text.config.num_hidden_layers, unet.config.use_linear_projection) == ("gelu", 23, True)
    # the two differ in the native size and the prediction type only
    def read(folder, sub):
        return json.loads((folder / sub).read_text())
    eps, v = folders
    assert read(eps, "unet/config.json") | {"sample_size": 96} == read(v, "unet/config.json")
    assert (read(eps, "unet/config.json")["sample_size"], read(v, "unet/config.json")["sample_size"]) == (64, 96)
    assert read(eps, "text_encoder/config.json") == read(v, "text_encoder/config.json")
    assert read(eps, "vae/config.json") == read(v, "vae/config.json")
    assert (read(eps, "scheduler/scheduler_config.json")["prediction_type"],
            read(v, "scheduler/scheduler_config.json")["prediction_type"]) == ("epsilon", "v_prediction")


def test_tiny_sd2_file_on_the_real_bundled_config_fails_by_name(sd2, no_hub):
    with pytest.raises(ModelLoadError, match=r"do not fit the config in .*configs/sd2"):
        ldm.load(sd2[1], device="cpu", dtype="float32")


def test_checkpoint_family_reads_only_the_header(sd2, tmp_path):
    from ldm.loading import checkpoint_family

    folder, file, _ = sd2
    assert checkpoint_family(file) == "sd2" and checkpoint_family(folder) == "sd"
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    pickle = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, pickle)
    assert checkpoint_family(lora) is None and checkpoint_family(pickle) is None and checkpoint_family(tmp_path / "x") is None
