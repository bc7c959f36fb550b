"""Prompt scheduling and AND on tiny random models, against hand-built diffusers references:

* [from:to:when] and [a|b]: diffusers' own pipeline (same scheduler, seeds) whose prompt embeddings
  (and SDXL's pooled embeddings) are swapped by `callback_on_step_end` at the steps A1111 switches;
* AND: diffusers' U-Net, scheduler and VAE called by hand, the sub-prompts' predictions combined as
  uncond + scale * (w1 (c1 - uncond) + w2 (c2 - uncond)).

Each test also shows the feature changes the result compared with the plain prompts. On these tiny random
models the last steps move the pixels by less than 1/255 (the first, high-noise steps decide the picture), so
a switch late in the run is checked on the final latents: equal to the reference's, and far from the plain
first text's; the pixels are compared with the plain second text's."""
from collections import Counter

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import ldm
import tiny_sdxl
from ldm import samplers
from ldm.metadata import parse_infotext
from pixels import gens, max_diff

TOL = 2  # per pixel, out of 255
W, H = 32, 24


def reference(cls, folder, sampler, seeds, **kw):
    pipe = cls.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


@pytest.fixture(scope="module")
def sd_ref(base_model):
    return reference(StableDiffusionPipeline, base_model, "Euler", [5], safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)


WEIGHTED = {}  # text with A1111 weights -> embeddings from our encoder (diffusers has no weights; tests/test_prompts.py)


def sd_embeds(ref, text):
    return WEIGHTED[text] if text in WEIGHTED else ref.encode_prompt(text, "cpu", 1, False)[0]


@pytest.fixture(scope="module", autouse=True)
def weighted_dog(base_pipe):
    for text in ("a photo of a (dog:8)", "(ugly:8)"):
        WEIGHTED[text] = base_pipe.prompts.encode_pair(text, "", need_negative=False)[0]


def swapping(texts_per_step, embeds_of, negative):
    """callback_on_step_end that sets step i+1's [negative, positive] embeddings after step i."""
    def callback(pipe, i, t, kwargs):
        if i + 1 < len(texts_per_step):
            return {"prompt_embeds": torch.cat([negative, embeds_of(texts_per_step[i + 1])])}
        return {}
    return callback


def run_sd_reference(ref, texts_per_step, negative_text="blurry", seed=5, output_type="pil"):
    negative = sd_embeds(ref, negative_text)
    ref.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(ref.scheduler.config))
    return ref(prompt_embeds=sd_embeds(ref, texts_per_step[0]), negative_prompt_embeds=negative, width=W, height=H,
               num_inference_steps=len(texts_per_step), guidance_scale=7.0, generator=gens(seed, 1),
               callback_on_step_end=swapping(texts_per_step, lambda t: sd_embeds(ref, t), negative),
               output_type=output_type).images


KW = dict(negative_prompt="blurry", width=W, height=H, guidance_scale=7.0, seed=5, sampler="Euler")
LATENT_TOL = 1e-4


@pytest.mark.parametrize("prompt,per_step", [
    # 6 steps: [cat:dog:0.5] ends "cat" at step 3; A1111's 0-based sampler step picks it for steps 0-3.
    ("a photo of a [cat:(dog:8):0.5]", ["a photo of a cat"] * 4 + ["a photo of a (dog:8)"] * 2),
    # [cat|dog]: cat at schedule step 1, dog at 2, ...; sampler steps 0,1 -> cat, 2 -> dog, 3 -> cat, ...
    ("a photo of a [cat|(dog:8)]", ["a photo of a cat"] * 2 + ["a photo of a (dog:8)", "a photo of a cat",
                                                              "a photo of a (dog:8)", "a photo of a cat"]),
])
def test_sd_schedule_matches_diffusers_with_swapped_embeddings(base_pipe, sd_ref, prompt, per_step):
    ours = base_pipe.txt2img(prompt, steps=len(per_step), **KW)
    theirs = run_sd_reference(sd_ref, per_step)
    diff = max_diff(ours.images, theirs)
    latent_diff = float((ours.latents - run_sd_reference(sd_ref, per_step, output_type="latent")).abs().max())
    first = base_pipe.txt2img(per_step[0], steps=len(per_step), **KW)
    switched = float((ours.latents - first.latents).abs().max())
    print(f"{prompt!r}: max pixel diff {diff}, latents {latent_diff:.2e}; the switch moves the latents {switched:.3f}")
    assert diff <= TOL and latent_diff <= LATENT_TOL
    assert switched > 100 * LATENT_TOL
    assert max_diff(ours.images, base_pipe.txt2img("a photo of a (dog:8)", steps=len(per_step), **KW).images) > TOL
    assert ours.infotexts[0].startswith(prompt + "\nNegative prompt: blurry\n")  # as written


def test_sd_scheduled_negative_prompt(base_pipe, sd_ref):
    """The negative prompt is scheduled too (A1111 schedules it with get_learned_conditioning)."""
    ours = base_pipe.txt2img("a photo of a cat", **{**KW, "negative_prompt": "[blurry:(ugly:8):0.25]"}, steps=4)
    negatives = ["blurry"] * 2 + ["(ugly:8)"] * 2
    cat = sd_embeds(sd_ref, "a photo of a cat")

    def callback(pipe, i, t, kwargs):
        return {"prompt_embeds": torch.cat([sd_embeds(sd_ref, negatives[i + 1]), cat])} if i + 1 < 4 else {}

    sd_ref.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(sd_ref.scheduler.config))
    theirs = sd_ref(prompt_embeds=cat, negative_prompt_embeds=sd_embeds(sd_ref, "blurry"), width=W, height=H,
                    num_inference_steps=4, guidance_scale=7.0, generator=gens(5, 1), callback_on_step_end=callback).images
    assert max_diff(ours.images, theirs) <= TOL
    plain = base_pipe.txt2img("a photo of a cat", **KW, steps=4)
    assert float((ours.latents - plain.latents).abs().max()) > 100 * LATENT_TOL


def composed_reference(ref, texts, weights, negative, steps, scale=7.0, seed=5, batch=1):
    """Euler by hand with diffusers' components: uncond + scale * sum w_i (c_i - uncond)."""
    sched = samplers.make_scheduler("Euler", "Automatic", dict(ref.scheduler.config))
    sched.set_timesteps(steps)
    ref.scheduler = sched
    latents = ref.prepare_latents(batch, 4, H, W, torch.float32, torch.device("cpu"), gens(seed, batch))
    rows = [sd_embeds(ref, negative).repeat(batch, 1, 1)] + [sd_embeds(ref, t).repeat(batch, 1, 1) for t in texts]
    embeds = torch.cat(rows)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * len(rows)), t)
            out = ref.unet(x, t, encoder_hidden_states=embeds).sample.chunk(len(rows))
            uncond = out[0]
            pred = uncond + scale * sum(w * (c - uncond) for w, c in zip(weights, out[1:]))
            latents = sched.step(pred, t, latents).prev_sample
        pixels = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    return ref.image_processor.postprocess(pixels, output_type="pil")


def test_sd_and_matches_composed_unet_outputs(base_pipe, sd_ref):
    calls = []
    hook = base_pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ours = base_pipe.txt2img("a photo of a cat AND a red hat:0.6", steps=4, batch_size=2, **KW)
    finally:
        hook.remove()
    assert calls == [6] * 4  # [uncond, cat, hat] x 2 images
    theirs = composed_reference(sd_ref, ["a photo of a cat", " a red hat"], [1.0, 0.6], "blurry", 4, batch=2)
    diff = max_diff(ours.images, theirs)
    print(f"AND: max pixel diff {diff}")
    assert diff <= TOL
    assert max_diff(ours.images, base_pipe.txt2img("a photo of a cat", steps=4, batch_size=2, **KW).images) > TOL
    assert parse_infotext(ours.infotexts[0])["Prompt"] == "a photo of a cat AND a red hat:0.6"  # PNG info round trip


def test_and_with_a_schedule_inside_and_a_weight_alone(base_pipe, sd_ref):
    """A trailing ':w' without AND weighs the guidance (A1111's re_weight), an AND part may be scheduled."""
    ours = base_pipe.txt2img("a photo of a cat:0.5", steps=3, **KW)
    theirs = composed_reference(sd_ref, ["a photo of a cat"], [0.5], "blurry", 3)
    assert max_diff(ours.images, theirs) <= TOL
    both = base_pipe.txt2img("[a cat:(dog:8):1] AND a hat", steps=5, **KW)
    first = base_pipe.txt2img("a cat AND a hat", steps=5, **KW)
    assert float((both.latents - first.latents).abs().max()) > 100 * LATENT_TOL  # the dog part after step 1


def test_hires_second_pass_continues_the_first_pass_timeline(base_pipe):
    """[a:b:1.1] (A1111): 1.1 of the first pass is past its end ('a' throughout); in the hires pass the
    fractions 1..2 are that pass, so 1.1 of 4 steps rounds down to 0 and 'b' runs throughout."""
    first = base_pipe.txt2img("a photo of a [cat:(dog:8):1.1]", steps=4, **KW)
    cat = base_pipe.txt2img("a photo of a cat", steps=4, **KW)
    assert max_diff(first.images, cat.images) == 0
    hires = base_pipe.hires_fix(first, scale=1.5, steps=4, strength=0.9)
    as_cat = base_pipe.hires_fix(cat, scale=1.5, steps=4, strength=0.9)
    as_dog = base_pipe.hires_fix(cat, "a photo of a (dog:8)", scale=1.5, steps=4, strength=0.9)
    assert max_diff(hires.images, as_cat.images) > TOL
    assert max_diff(hires.images, as_dog.images) == 0
    assert hires.infotexts[0].startswith("a photo of a [cat:(dog:8):1.1]\n")


def test_and_needs_guidance_and_counts_every_sub_prompt(base_pipe):
    with pytest.raises(ValueError, match="AND combines sub-prompts through guidance.*CFG scale 1"):
        base_pipe.txt2img("a cat AND a dog", guidance_scale=1.0, steps=1, width=W, height=H)
    with pytest.raises(ValueError, match="weight ':0.5' at the end of the prompt"):
        base_pipe.txt2img("a cat:0.5", guidance_scale=1.0, steps=1, width=W, height=H)
    small = base_pipe.with_options(max_prompt_tokens=150)
    small.txt2img("a cat AND a dog", steps=1, width=W, height=H)  # 2 sub-prompts x 75
    with pytest.raises(ValueError, match="3 AND sub-prompts count as 225 tokens .*limit is 150"):
        small.txt2img("a cat AND a dog AND a hat", steps=1, width=W, height=H)


def test_unbalanced_and_odd_prompts_do_not_crash(base_pipe):
    for prompt in ("a [cat:dog", "a [cat|dog", "a | b [c:d:2]", "[a:b:1e400]", "a\\", "AND", "[::]", "[|]"):
        assert base_pipe.txt2img(prompt, steps=2, width=W, height=H, seed=1).images[0].size == (W, H)


# ---- SDXL: the pooled embeddings follow the schedule ---------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-schedule"))


def test_sdxl_schedule_swaps_embeddings_and_pooled(sdxl_model):
    pipe = ldm.load(sdxl_model, device="cpu", dtype="float32")
    ours = pipe.txt2img("a photo of a [cat:dog:0.25]", steps=8, **KW)
    per_step = ["a photo of a cat"] * 3 + ["a photo of a dog"] * 5  # ends "cat" at step 2: sampler steps 0-2
    ref = reference(StableDiffusionXLPipeline, sdxl_model, "Euler", ours.seeds, add_watermarker=False)
    enc = {t: ref.encode_prompt(t, device="cpu", do_classifier_free_guidance=False) for t in set(per_step)}
    neg, _, neg_pooled, _ = ref.encode_prompt("blurry", device="cpu", do_classifier_free_guidance=False)

    def callback(pipe_, i, t, kwargs):
        if i + 1 >= len(per_step):
            return {}
        e, _, pooled, _ = enc[per_step[i + 1]]
        return {"prompt_embeds": torch.cat([neg, e]), "add_text_embeds": torch.cat([neg_pooled, pooled])}

    def run_ref(output_type):
        ref.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(ref.scheduler.config))
        e, _, pooled, _ = enc[per_step[0]]
        return ref(prompt_embeds=e, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                   negative_pooled_prompt_embeds=neg_pooled, width=W, height=H, num_inference_steps=8, guidance_scale=7.0,
                   generator=gens(5, 1), callback_on_step_end=callback, output_type=output_type,
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"]).images

    diff = max_diff(ours.images, run_ref("pil"))
    latent_diff = float((ours.latents - run_ref("latent")).abs().max())
    cat = pipe.txt2img("a photo of a cat", steps=8, **KW)
    switched = float((ours.latents - cat.latents).abs().max())
    print(f"sdxl [cat:dog:0.25]: max pixel diff {diff}, latents {latent_diff:.2e}; the switch moves them {switched:.4f}")
    assert diff <= TOL and latent_diff <= LATENT_TOL
    assert switched > 10 * LATENT_TOL
    anded = pipe.txt2img("a photo of a cat AND a hat:0.5", steps=2, **KW)  # pooled rows per sub-prompt
    assert max_diff(anded.images, pipe.txt2img("a photo of a cat", steps=2, **KW).images) > TOL


def test_refiner_takes_the_same_sub_prompts_and_schedule(sdxl_model, tmp_path):
    """The refiner encodes the same plan with its own encoder: its batch has the same AND groups."""
    pipe = ldm.load(sdxl_model, device="cpu", dtype="float32")
    refiner = ldm.load(tiny_sdxl.save_refiner(tmp_path / "refiner"), device="cpu", dtype="float32")
    kw = dict(steps=5, seed=3, sampler="Euler", width=W, height=H, refiner=refiner, refiner_switch_at=0.6)
    calls = []
    hook = refiner.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        anded = pipe.txt2img("a castle AND a hill:0.5", negative_prompt="fog", **kw)
    finally:
        hook.remove()
    assert calls and set(calls) == {3}  # [uncond, castle, hill] on the refiner's steps
    plain = pipe.txt2img("a castle", negative_prompt="fog", **kw)
    assert max_diff(anded.images, plain.images) > TOL
    scheduled = pipe.txt2img("[a castle:a hill:0.6]", negative_prompt="[fog:rain:0.6]", **kw)
    assert scheduled.images[0].size == (W, H)


def test_each_distinct_text_is_tokenized_once_per_run(base_model, monkeypatch):
    """The length checks (the whole prompt, each AND sub-prompt's share) and the encoding read one
    tokenization per text: no text goes through the tokenizer twice in a run."""
    pipe = ldm.load(base_model, device="cpu", dtype="float32")  # a fresh model: nothing tokenized yet
    tokenizer = pipe.tokenizer
    real = type(tokenizer).__call__
    read = []

    def counting(self, text, *args, **kwargs):
        if self is tokenizer:
            read.extend([text] if isinstance(text, str) else text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    pipe.txt2img("a cat AND a [dog:fox:0.5]:0.8", negative_prompt="blurry", width=W, height=H, steps=2, seed=1)
    assert {"a cat", "blurry"} <= {t.strip() for t in read} and any("fox" in t for t in read)
    assert [t for t, n in Counter(read).items() if n > 1] == []
