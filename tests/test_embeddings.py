"""Textual-inversion embeddings by file name: parity with diffusers' load_textual_inversion, A1111's chunk
rules (vectors count toward the 75 tokens, never straddle chunks), weights, infotext, odd files."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import ldm
from ldm import samplers
from ldm.prompts import CHUNK_TOKENS, PLACEHOLDER

TOL = 2
VISIBLE = 10
KW = dict(width=32, height=32, steps=4, guidance_scale=7.5, seed=9, sampler="Euler", negative_prompt="blurry")


def vectors(n, seed, dim=32):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 0.5  # ~ the token embeddings' scale


@pytest.fixture(scope="module")
def ti_env(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("ti") / "models"
    pipe = ldm.load(base_model, models_dir=root, device="cpu", dtype="float32")
    emb = root / "embeddings"
    save_file({"emb_params": vectors(3, 1)}, str(emb / "mystyle.safetensors"))  # multi-vector, A1111 safetensors
    (emb / "sub").mkdir()
    save_file({"string_to_param.*": vectors(1, 2)}, str(emb / "sub" / "glowy.safetensors"))  # A1111's key, a subfolder
    save_file({"emb_params": vectors(2, 3, dim=48)}, str(emb / "widething.safetensors"))  # another model's width
    save_file({"clip_l": vectors(2, 4), "clip_g": vectors(2, 5, dim=48)}, str(emb / "xlthing.safetensors"))  # SDXL
    return root, pipe


def reference(base_model, root, seeds, lora=None):
    pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    pipe.load_textual_inversion(str(root / "embeddings" / "mystyle.safetensors"), token="mystyle")
    if lora:
        pipe.load_lora_weights(str(root / "Lora" / f"{lora}.safetensors"), adapter_name=lora)
        pipe.set_adapters([lora], [0.8])
    return pipe


def theirs(pipe, prompt):
    return pipe(prompt, negative_prompt="blurry", width=32, height=32, num_inference_steps=4, guidance_scale=7.5,
                generator=[torch.Generator("cpu").manual_seed(KW["seed"])]).images[0]


def diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_multi_vector_embedding_matches_diffusers(base_model, base_pipe, ti_env):
    root, pipe = ti_env
    ours = pipe.txt2img("a photo of mystyle cube", **KW)
    ref = theirs(reference(base_model, root, ours.seeds), "a photo of mystyle cube")
    as_words = base_pipe.txt2img("a photo of mystyle cube", **KW)  # no models folder: plain words
    assert diff(ours.images[0], as_words.images[0]) > VISIBLE
    assert diff(ours.images[0], ref) <= TOL
    h = pipe.library.short_hash(pipe.library.find("embeddings", "mystyle"))
    assert f"TI hashes: \"mystyle: {h}\"" in ours.infotexts[0] and len(h) == 12


def test_lora_and_embedding_together_match_diffusers(base_model, ti_env):
    from test_lora import kohya_lora

    root, pipe = ti_env
    save_file(kohya_lora(pipe.unet, pipe.text_encoder, seed=7), str(root / "Lora" / "ink.safetensors"))
    ours = pipe.txt2img("a photo of mystyle cube <lora:ink:0.8>", **KW)
    ref = theirs(reference(base_model, root, ours.seeds, lora="ink"), "a photo of mystyle cube ")
    assert diff(ours.images[0], pipe.txt2img("a photo of mystyle cube", **KW).images[0]) > VISIBLE
    assert diff(ours.images[0], ref) <= TOL
    assert "Lora hashes" in ours.infotexts[0] and "TI hashes" in ours.infotexts[0]


def test_a1111_string_to_param_and_subfolders(ti_env):
    _, pipe = ti_env
    (chunk,) = pipe.prompts.chunks("glowy cat")
    assert [(o, e.name) for o, e in chunk.fixes] == [(0, "glowy")] and chunk.ids[0] == PLACEHOLDER
    assert len(chunk.ids) == 1 + len(pipe.tokenizer("cat", add_special_tokens=False)["input_ids"])


def test_vectors_count_toward_the_chunk_and_never_straddle(ti_env):
    _, pipe = ti_env
    filler = " ".join(["cat"] * (CHUNK_TOKENS - 2))  # 73 tokens: 2 places left, the embedding needs 3
    chunks = pipe.prompts.chunks(f"{filler} mystyle dog")
    assert len(chunks) == 2 and len(chunks[0].ids) == CHUNK_TOKENS - 2 and chunks[0].fixes == []
    assert [o for o, _ in chunks[1].fixes] == [0] and chunks[1].ids[:3] == [PLACEHOLDER] * 3
    assert pipe.family.token_count("mystyle") == 3  # what the prompt-length limit counts
    # The comma backtrack carries an embedding into the next chunk with its place.
    text = " ".join(["cat"] * 60) + ", " + "dog " * 10 + "mystyle " + "cow " * 5
    chunks = pipe.prompts.chunks(text)
    assert len(chunks) == 2 and chunks[0].fixes == []
    (offset, emb), = chunks[1].fixes
    assert emb.name == "mystyle" and chunks[1].ids[offset : offset + 3] == [PLACEHOLDER] * 3


def test_weights_apply_to_the_vectors(ti_env):
    _, pipe = ti_env
    (chunk,) = pipe.prompts.chunks("a (mystyle:1.2) cube")
    (offset, _), = chunk.fixes
    assert chunk.weights[offset : offset + 3] == [1.2] * 3 and chunk.weights[0] == 1.0
    plain = pipe.txt2img("a mystyle cube", **KW)
    weighted = pipe.txt2img("a (mystyle:1.2) cube", **KW)
    assert not torch.equal(plain.latents, weighted.latents)


def test_embeddings_of_another_width_are_skipped_as_a1111(ti_env):
    _, pipe = ti_env
    (chunk,) = pipe.prompts.chunks("widething xlthing")
    assert [e.name for _, e in chunk.fixes] == ["xlthing"]  # SDXL file: its CLIP-L part fits a 32-wide encoder
    assert any(s.startswith("widething: width 48") for s in pipe.prompts.embeddings.skipped)


def test_new_and_removed_files_are_seen_without_reloading(ti_env):
    root, pipe = ti_env
    assert pipe.prompts.chunks("freshword")[0].fixes == []
    path = root / "embeddings" / "freshword.safetensors"
    save_file({"emb_params": vectors(1, 11)}, str(path))
    assert [e.name for _, e in pipe.prompts.chunks("freshword")[0].fixes] == ["freshword"]
    path.unlink()
    assert pipe.prompts.chunks("freshword")[0].fixes == []


def test_corrupt_or_pickled_embedding_is_skipped_not_fatal(ti_env, caplog):
    root, pipe = ti_env
    (root / "embeddings" / "broken.safetensors").write_bytes(b"\x80\x02" + b"\x00" * 40)
    (root / "embeddings" / "old.pt").write_bytes(b"\x80\x02")
    r = pipe.txt2img("broken old cube", **KW)
    assert "TI hashes" not in r.infotexts[0] and "broken" in caplog.text
    assert [p.name for p, _ in pipe.library.refused("embeddings")] == ["old.pt"]
    (root / "embeddings" / "broken.safetensors").unlink()


def test_comfyui_explicit_form_and_unknown_names(ti_env):
    _, pipe = ti_env
    (chunk,) = pipe.prompts.chunks("a embedding:mystyle cube, embedding:sub/glowy.")
    assert [e.name for _, e in chunk.fixes] == ["mystyle", "glowy"]
    with pytest.raises(ValueError, match="close names: mystyle"):
        pipe.txt2img("a embedding:mystlye cube", **KW)
    with pytest.raises(ValueError, match="does not fit this model.*width 48"):
        pipe.txt2img("a embedding:widething cube", **KW)
