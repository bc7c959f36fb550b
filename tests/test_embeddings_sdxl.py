"""SDXL textual inversions (A1111's files with `clip_l` and `clip_g`): each encoder takes its own part at the
same token places; parity with diffusers' load_textual_inversion run once per encoder."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

import ldm
import tiny_sdxl
from ldm import samplers
from ldm.prompts import PLACEHOLDER
from pixels import gens, max_diff

TOL = 2
VISIBLE = 10
KW = dict(negative_prompt="blurry", width=32, height=32, steps=4, guidance_scale=7.5, seed=3, sampler="Euler")


def vectors(n, seed, dim):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 0.5  # ~ the token embeddings' scale


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-ti")
    folder = tiny_sdxl.save_model(tmp / "xl")
    emb = tmp / "models" / "embeddings"
    emb.mkdir(parents=True)
    save_file({"clip_l": vectors(2, 1, 32), "clip_g": vectors(2, 2, 48)}, str(emb / "xlstyle.safetensors"))
    save_file({"emb_params": vectors(1, 3, 32)}, str(emb / "sdonething.safetensors"))  # SD 1.x: one part only
    save_file({"clip_l": vectors(1, 4, 32)}, str(emb / "halfthing.safetensors"))  # no clip_g
    pipe = ldm.load(folder, models_dir=tmp / "models", device="cpu", dtype="float32")
    return folder, emb, pipe


def reference(folder, emb, seeds):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    from safetensors.torch import load_file

    parts = load_file(str(emb / "xlstyle.safetensors"))
    pipe.load_textual_inversion(parts["clip_l"], token="xlstyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(parts["clip_g"], token="xlstyle", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


def test_sdxl_embedding_goes_into_both_encoders_and_matches_diffusers(env):
    folder, emb, pipe = env
    prompt = "a photo of xlstyle cube"
    ours = pipe.txt2img(prompt, **KW)
    ref = reference(folder, emb, ours.seeds)
    theirs = ref(prompt, negative_prompt="blurry", width=32, height=32, num_inference_steps=4, guidance_scale=7.5,
                 generator=gens(3, 1)).images
    as_words = ldm.load(folder, device="cpu", dtype="float32").txt2img(prompt, **KW)  # no models folder: plain words
    print(f"sdxl embedding: vs diffusers {max_diff(ours.images, theirs)}, "
          f"vs plain words {max_diff(ours.images, as_words.images)}")
    assert max_diff(ours.images, as_words.images) > VISIBLE
    assert max_diff(ours.images, theirs) <= TOL
    h = pipe.library.short_hash(pipe.library.find("embeddings", "xlstyle"))
    assert f'TI hashes: "xlstyle: {h}"' in ours.infotexts[0]


def test_each_part_matters(env, tmp_path):
    """Either part alone changes the picture: CLIP-L really gets clip_l and bigG really gets clip_g."""
    folder, emb, pipe = env
    base = pipe.txt2img("xlstyle cube", **KW).images
    for part, dim, seed in (("clip_l", 32, 8), ("clip_g", 48, 9)):
        data = {"clip_l": vectors(2, 1, 32), "clip_g": vectors(2, 2, 48), part: vectors(2, seed, dim)}
        models = tmp_path / part / "models"
        (models / "embeddings").mkdir(parents=True)
        save_file(data, str(models / "embeddings" / "xlstyle.safetensors"))
        other = ldm.load(folder, models_dir=models, device="cpu", dtype="float32")
        assert max_diff(other.txt2img("xlstyle cube", **KW).images, base) > 0, part


def test_files_without_both_parts_are_words_on_sdxl(env):
    _, _, pipe = env
    chunks = pipe.family.chunks("sdonething halfthing xlstyle", pipe.family.tables())
    assert [e.name for c in chunks for _, e in c.fixes] == ["xlstyle"]
    assert pipe.family.token_count("xlstyle") == 2 and chunks[0].ids.count(PLACEHOLDER) == 2
    with pytest.raises(ValueError, match="halfthing.*does not fit this model"):
        pipe.txt2img("embedding:halfthing cube", **KW)


def test_negative_prompt_embedding_and_weights(env):
    _, _, pipe = env
    plain = pipe.txt2img("a cube", **KW)
    negative = pipe.txt2img("a cube", **{**KW, "negative_prompt": "blurry xlstyle"})
    assert max_diff(plain.images, negative.images) > 0 and "TI hashes" in negative.infotexts[0]
    weighted = pipe.txt2img("a (xlstyle:1.3) cube", **KW)
    assert max_diff(weighted.images, pipe.txt2img("a xlstyle cube", **KW).images) > 0
