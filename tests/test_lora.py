"""LoRA by A1111 tag: parity with diffusers + peft (the oracle), exact restore, caching, tags, bad input."""
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import ldm
from ldm import samplers
from ldm.lora import LoraError, read_layers
from ldm.prompt_tags import LoraTag, extract_loras

pytest.importorskip("peft")  # the oracle (requirements-dev.txt); the library itself never needs it

TOL = 2  # per pixel, out of 255
VISIBLE = 10  # a LoRA must change the image by more than this, or the parity test proves nothing

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
UNET_MODULES = [  # self- and cross-attention, feed-forward, 3x3 convolutions
    f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_k", f"{BLOCK}.attn1.to_v", f"{BLOCK}.attn1.to_out.0",
    f"{BLOCK}.attn2.to_k", f"{BLOCK}.attn2.to_v", f"{BLOCK}.ff.net.0.proj", f"{BLOCK}.ff.net.2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2",
]
# All four projections: without out_proj diffusers guesses another format and silently drops the text-encoder part.
TE_MODULES = [f"encoder.layers.{i}.self_attn.{p}_proj" for i in (0, 3) for p in ("q", "k", "v", "out")] + [
    "encoder.layers.1.mlp.fc1"]


def kohya_lora(unet, te, *, seed, rank=4, alpha=2.0, scale=0.3) -> dict:
    """Random kohya-format LoRA tensors for the tiny model's modules."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, model, names in (("lora_unet_", unet, UNET_MODULES), ("lora_te_text_model_", te, TE_MODULES)):
        for name in names:
            w = model.get_submodule(name).weight
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * scale
            out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * scale
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def to_peft(kohya: dict) -> dict:
    """The same LoRA in diffusers/PEFT layout (no alpha: alpha/rank folded into lora_B)."""
    out = {}
    for key, t in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        layer = key[: -len(".lora_down.weight")]
        up, alpha = kohya[f"{layer}.lora_up.weight"], float(kohya[f"{layer}.alpha"])
        module = next(m for m in UNET_MODULES + TE_MODULES if layer.endswith(m.replace(".", "_")))
        prefix = "unet." if layer.startswith("lora_unet_") else "text_encoder.text_model."
        out[f"{prefix}{module}.lora_A.weight"] = t
        out[f"{prefix}{module}.lora_B.weight"] = up * (alpha / t.shape[0])
    return out


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory, base_model):
    """A models folder with two LoRAs, our pipeline on it, and diffusers' pipeline on the same weights."""
    root = tmp_path_factory.mktemp("lora") / "models"  # created with the layout by ldm.load
    ours = ldm.load(base_model, models_dir=root, device="cpu", dtype="float32")
    for name, seed in (("style", 1), ("detail", 2)):
        save_file(kohya_lora(ours.unet, ours.text_encoder, seed=seed), str(root / "Lora" / f"{name}.safetensors"))
    return root, ours


def reference(base_model, root, loras: dict, seeds):
    """diffusers + peft with `loras` = {name: weight or {"unet": w, "text_encoder": w}} active."""
    pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    for name in loras:
        pipe.load_lora_weights(str(root / "Lora" / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(list(loras), list(loras.values()))
    return pipe


KW = dict(width=32, height=32, steps=4, guidance_scale=7.5, seed=5, sampler="Euler", negative_prompt="blurry")


def theirs(pipe, prompt):
    g = [torch.Generator("cpu").manual_seed(KW["seed"])]
    return pipe(prompt, negative_prompt=KW["negative_prompt"], width=32, height=32, num_inference_steps=4,
                guidance_scale=7.5, generator=g).images[0]


def diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize("tags, loras", [
    ("<lora:style:0.6>", {"style": 0.6}),
    ("<lora:style:1>", {"style": 1.0}),
    ("<lora:style:0.6> <lora:detail:1>", {"style": 0.6, "detail": 1.0}),
    ("<lora:style:0.5:1.0>", {"style": {"text_encoder": 0.5, "unet": 1.0}}),
])
def test_matches_diffusers_and_peft(base_model, lora_env, tags, loras):
    root, pipe = lora_env
    base = pipe.txt2img("a red cube", **KW).images[0]
    ours = pipe.txt2img(f"a red cube {tags}", **KW)
    ref = theirs(reference(base_model, root, loras, ours.seeds), "a red cube ")
    assert diff(ours.images[0], base) > VISIBLE  # the LoRA visibly acts, so the parity below means something
    assert diff(ours.images[0], ref) <= TOL
    assert ours.infotexts[0].startswith(f"a red cube {tags}\n")  # the infotext keeps the tags, as A1111's
    hashes = ", ".join(f"{n}: {pipe.library.short_hash(pipe.library.find('loras', n))}" for n in loras)
    assert f'Lora hashes: "{hashes}"' in ours.infotexts[0]


def test_text_encoder_part_alone_changes_the_image(lora_env):
    _, pipe = lora_env
    base = pipe.txt2img("a red cube", **KW).images[0]
    te_only = pipe.txt2img("a red cube <lora:style:1:0>", **KW).images[0]
    assert diff(te_only, base) > VISIBLE


def test_base_model_is_bit_identical_after_a_lora_call(lora_env):
    _, pipe = lora_env
    weights = {k: v for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in weights.items()}
    first = pipe.txt2img("a red cube", **KW)
    pipe.txt2img("a red cube <lora:style:0.8> <lora:detail:0.4>", **KW)
    after = pipe.txt2img("a red cube", **KW)
    assert torch.equal(first.latents, after.latents)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(after.images[0]))
    now = {k: v for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], now[k]) for k in before)
    assert all(now[k].data_ptr() == weights[k].data_ptr() for k in weights)  # the very same tensors are back


def test_repeated_lora_set_is_merged_once(lora_env, monkeypatch):
    _, pipe = lora_env
    import ldm.lora as lora_module

    reads = []
    real = lora_module.read_layers
    monkeypatch.setattr(lora_module, "read_layers", lambda *a: reads.append(a[0]) or real(*a))
    pipe.networks.clear_cache()
    a = pipe.txt2img("x <lora:detail:0.7>", **KW)
    b = pipe.txt2img("x <lora:detail:0.7>", **KW)
    assert len(reads) == 1 and torch.equal(a.latents, b.latents)
    pipe.txt2img("x <lora:detail:0.5>", **KW)  # another multiplier is another set
    assert len(reads) == 2


def test_peft_layout_merges_like_kohya(tmp_path, lora_env):
    root, pipe = lora_env
    kohya = {k: v for k, v in kohya_lora(pipe.unet, pipe.text_encoder, seed=3).items()}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(to_peft(kohya), str(tmp_path / "p.safetensors"))
    k = {(l.component, l.module): l for l in read_layers(tmp_path / "k.safetensors", pipe.components)}
    p = {(l.component, l.module): l for l in read_layers(tmp_path / "p.safetensors", pipe.components)}
    assert k.keys() == p.keys() and len(k) == len(UNET_MODULES) + len(TE_MODULES)
    for target, layer in k.items():
        w = getattr(pipe.components, target[0]).get_submodule(target[1]).weight
        assert torch.allclose(layer.delta(w), p[target].delta(w), atol=1e-6)


def test_tags_parse_like_a1111():
    text, tags = extract_loras("a <lora:x:0.5> cat <lyco:y:0.2:0.9>, <lora:z> <lora:w:te=0.3:unet=0.7> <other:q>")
    assert text == "a  cat ,   <other:q>"  # tags removed; a tag of another kind is plain text
    assert tags == [LoraTag("x", 0.5, 0.5), LoraTag("y", 0.2, 0.9), LoraTag("z", 1.0, 1.0), LoraTag("w", 0.3, 0.7)]
    assert LoraTag("x", 0.5, 0.5).tag() == "<lora:x:0.5>" and LoraTag("y", 0.2, 1).tag() == "<lora:y:0.2:1>"
    with pytest.raises(ValueError, match="not a number"):
        extract_loras("<lora:x:heavy>")
    with pytest.raises(ValueError, match="hypernetworks are not supported"):
        extract_loras("<hypernet:x:1>")


def test_negative_prompt_tags_are_not_parsed(lora_env):
    _, pipe = lora_env
    r = pipe.txt2img("a red cube", **{**KW, "negative_prompt": "<lora:nothing-by-this-name:1>"})
    assert "Lora hashes" not in r.infotexts[0]


def test_unknown_name_lists_close_names(lora_env):
    _, pipe = lora_env
    with pytest.raises(ldm.UnknownModelName, match="close names: style"):
        pipe.txt2img("a <lora:stlye:1>", **KW)


def test_lora_tag_without_a_models_folder_is_an_error(base_pipe):
    with pytest.raises(ValueError, match="models_dir"):
        base_pipe.txt2img("a <lora:style:1>", width=32, height=32, steps=1)


def _bad(root, name, tensors):
    save_file(tensors, str(root / "Lora" / f"{name}.safetensors"))


@pytest.mark.parametrize("name, tensors, message", [
    ("loha", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, "LoHa"),
    ("lokr", {"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ("dora", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.dora_scale": torch.zeros(2)}, "DoRA"),
    ("diff", {"lora_unet_x.diff": torch.zeros(2, 2)}, "full-rank"),
    ("sdxl", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 2),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)},
     "1 of 2 of its layers match.*SDXL"),
    ("shape", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 2)},
     "do not fit its weight"),
    ("junk", {"something.weight": torch.zeros(2)}, "unrecognised key"),
])
def test_unsupported_or_mismatched_files_apply_nothing(lora_env, name, tensors, message):
    root, pipe = lora_env
    _bad(root, name, tensors)
    before = {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(LoraError, match=message):
        pipe.txt2img(f"a <lora:style:1> <lora:{name}:1>", **KW)
    assert {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()} == before


def test_pickled_lora_is_refused(lora_env):
    root, pipe = lora_env
    (root / "Lora" / "old.pt").write_bytes(b"\x80\x02}q\x00." + b"\x00" * 64)
    with pytest.raises(ldm.UnknownModelName, match="pickle"):
        pipe.txt2img("a <lora:old:1>", **KW)
    shutil.copy(root / "Lora" / "old.pt", root / "Lora" / "renamed.safetensors")
    with pytest.raises(ldm.ModelLoadError, match="pickle"):
        pipe.txt2img("a <lora:renamed:1>", **KW)


def test_infotext_round_trip_restores_the_tags(lora_env):
    from ldm.metadata import infotext_to_kwargs, parse_infotext

    _, pipe = lora_env
    r = pipe.txt2img("a red cube <lora:style:0.6> <lora:detail:0.3:0.9>", **KW)
    info = parse_infotext(r.infotexts[0])
    h = {n: pipe.library.short_hash(pipe.library.find("loras", n)) for n in ("style", "detail")}
    assert info["Lora hashes"] == f"style: {h['style']}, detail: {h['detail']}"
    again = pipe.txt2img(**{**infotext_to_kwargs(info), "sampler": "Euler"})
    assert again.infotexts[0] == r.infotexts[0] and torch.equal(again.latents, r.latents)


def test_channels_last_weights_keep_their_layout(base_model, lora_env):
    root, pipe = lora_env
    cl = ldm.load(base_model, models_dir=root, device="cpu", dtype="float32", channels_last=True)
    conv = cl.unet.get_submodule("down_blocks.0.resnets.0.conv1").weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = cl.unet.get_submodule("down_blocks.0.resnets.0.conv1").register_forward_pre_hook(
        lambda m, a: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    try:
        ours = cl.txt2img("a red cube <lora:style:0.6>", **KW)
    finally:
        hook.remove()
    assert seen and all(seen)
    assert diff(ours.images[0], pipe.txt2img("a red cube <lora:style:0.6>", **KW).images[0]) <= TOL


def test_peft_alpha_from_diffusers_metadata(tmp_path, lora_env):
    import json

    _, pipe = lora_env
    kohya = kohya_lora(pipe.unet, pipe.text_encoder, seed=4, alpha=3.0)
    plain = {k: v for k, v in to_peft({**kohya, **{k: torch.tensor(4.0) for k in kohya if k.endswith(".alpha")}}).items()}
    meta = {"unet.lora_alpha": 3, "unet.r": 4, "text_encoder.lora_alpha": 8,
            "text_encoder.alpha_pattern": {"encoder.layers.0.self_attn.q_proj": 3}}
    save_file(plain, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    got = {(l.component, l.module): l for l in read_layers(tmp_path / "p.safetensors", pipe.components)}
    assert got[("unet", UNET_MODULES[0])].alpha == 3.0
    assert got[("text_encoder", "encoder.layers.0.self_attn.q_proj")].alpha == 3.0
    assert got[("text_encoder", "encoder.layers.0.self_attn.k_proj")].alpha == 8.0
