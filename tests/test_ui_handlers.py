"""The UI handlers (ui.tasks and the modules under it) with tiny pipelines: no server, no browser."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny
from ui import convert, editor, saving, state, streaming, tasks


@pytest.fixture(scope="module")
def upscale_pipe(tmp_path_factory):
    import ldm

    return ldm.load(tiny.save_upscaler(tmp_path_factory.mktemp("tiny-x4")), device="cpu", dtype="float32")


@pytest.fixture
def ctx(base_pipe, tmp_path):
    return state.Context(state.Pipes(base_pipe), state.Options(outputs=tmp_path / "outputs", preview_every=2))


@pytest.fixture
def picture(tmp_path) -> Path:
    """A 32x32 noise PNG: every pixel differs from its neighbours, so any change shows."""
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def square_mask(size=32, box=(8, 8, 24, 24), mode="L") -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB")), axis=-1)


# ---- txt2img / img2img ----------------------------------------------------------------------


def test_txt2img_streams_previews_then_saves_pngs_with_infotext(ctx):
    items = list(tasks.txt2img(ctx, prompt="a red circle", steps=4, seed=10, batch_count=2))
    steps = [i for i in items if isinstance(i, streaming.Step)]
    out = items[-1]
    assert isinstance(out, streaming.Output) and not out.stopped and not out.warnings
    assert out.seeds == [10, 11]
    assert {(s.batch, s.batch_count) for s in steps} == {(0, 2), (1, 2)}
    # previews every 2 steps, never on the last one (the decoded image follows)
    assert {s.step for s in steps if s.preview is not None} == {2}
    assert all(s.preview is None for s in steps if s.step == s.total)
    names = [Path(p).name for p in out.images]
    assert names == ["00000-10-a-red-circle.png", "00001-11-a-red-circle.png"]
    for path, info in zip(out.images, out.infotexts):
        assert Path(path).parent == ctx.options.outputs / "txt2img"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.info["parameters"] == info
    assert "Seed: 11" in out.infotexts[1]


def test_txt2img_random_seed_and_slider_floats(ctx):
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2.0, seed=-1, batch_size=2.0, width=40.0, height=32))
    assert out.seeds[1] == out.seeds[0] + 1 and out.seeds[0] >= 0
    with Image.open(out.images[0]) as im:
        assert im.size == (40, 32)


def test_txt2img_hires_fix_doubles_the_size(ctx):
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, seed=1, hires_scale=2.0, hires_strength=0.5))
    with Image.open(out.images[0]) as im:
        assert im.size == (64, 64)


def test_txt2img_fast_checkbox_reaches_the_library(ctx):
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=4, seed=1, fast=True))
    plain = streaming.run(tasks.txt2img(ctx, prompt="x", steps=4, seed=1))
    assert "Fast: True" in out.infotexts[0] and "Fast" not in plain.infotexts[0]


def test_validation_errors_are_value_errors(ctx):
    with pytest.raises(ValueError, match="multiple of 8"):
        streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, width=33))
    with pytest.raises(ValueError, match="steps must be a whole number"):
        tasks.txt2img(ctx, steps=2.5)
    with pytest.raises(ValueError, match="batch_count"):
        streaming.run(tasks.txt2img(ctx, steps=1, batch_count=0))


def test_img2img_keeps_the_image_size(ctx, picture):
    out = streaming.run(tasks.img2img(ctx, image=str(picture), prompt="x", strength=0.5, steps=4, seed=3, width=0, height=0))
    with Image.open(out.images[0]) as im:
        assert im.size == (32, 32) and "Denoising strength: 0.5" in im.info["parameters"]
    with pytest.raises(ValueError, match="no image"):
        tasks.img2img(ctx, image=None)


def test_upload_size_limit(ctx, picture):
    ctx.options.max_upload_mb = 0.0001
    with pytest.raises(ValueError, match="the limit is"):
        tasks.img2img(ctx, image=str(picture))


# ---- inpaint / outpaint ---------------------------------------------------------------------


def test_inpaint_with_uploaded_mask_changes_only_the_masked_area(ctx, picture, tmp_path):
    mask_path = tmp_path / "mask.png"
    square_mask().save(mask_path)
    out = streaming.run(tasks.inpaint(ctx, image=str(picture), mask=str(mask_path), prompt="x", steps=3, seed=1, mask_blur=0,
                          strength=1.0))
    with Image.open(picture) as before, Image.open(out.images[0]) as after:
        diff = changed(before, after)
    assert not diff[~np.asarray(square_mask(), bool)].any()
    assert diff[8:24, 8:24].mean() > 0.5


def test_inpaint_mask_alpha_means_transparent_is_repainted(ctx, picture, tmp_path):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half erased = repaint
    path = tmp_path / "alpha.png"
    rgba.save(path)
    out = streaming.run(tasks.inpaint(ctx, image=str(picture), mask=str(path), steps=2, seed=1, mask_blur=0))
    with Image.open(picture) as before, Image.open(out.images[0]) as after:
        diff = changed(before, after)
    assert not diff[:, 16:].any() and diff[:, :16].mean() > 0.5


def editor_value(picture: Path, stroke=(8, 8, 24, 24)) -> dict:
    """What gr.ImageEditor(type="pil") hands over: background, transparent layers with opaque strokes."""
    background = Image.open(picture).convert("RGBA")
    layer = Image.new("RGBA", background.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), stroke)
    return {"background": background, "layers": [layer], "composite": background}


def test_editor_drawing_becomes_a_white_on_black_mask(ctx, picture):
    image, mask = editor.editor_to_image_and_mask(editor_value(picture))
    assert image.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(np.asarray(mask) > 0, np.asarray(square_mask()) > 0)
    out = streaming.run(tasks.inpaint(ctx, image=image, mask=mask, steps=2, seed=1, mask_blur=0))
    with Image.open(picture) as before, Image.open(out.images[0]) as after:
        diff = changed(before, after)
    assert not diff[~np.asarray(square_mask(), bool)].any()


def test_editor_needs_an_image_and_some_paint(picture):
    with pytest.raises(ValueError, match="no image"):
        editor.editor_to_image_and_mask({"background": None, "layers": []})
    empty = editor_value(picture)
    empty["layers"] = [Image.new("RGBA", (32, 32), (0, 0, 0, 0))]
    with pytest.raises(ValueError, match="no mask"):
        editor.editor_to_image_and_mask(empty)
    # an uploaded mask wins over the (empty) drawing
    _, mask = editor.editor_to_image_and_mask(empty, square_mask())
    assert mask.getextrema() == (0, 255)


def test_outpaint_extends_the_canvas(ctx, picture):
    out = streaming.run(tasks.outpaint(ctx, image=str(picture), prompt="x", left=8, bottom=16, steps=2, seed=1))
    with Image.open(out.images[0]) as after, Image.open(picture) as before:
        assert after.size == (40, 48)
        assert np.array_equal(np.asarray(after.convert("RGB"))[:32, 8:], np.asarray(before))


# ---- upscale --------------------------------------------------------------------------------


def test_upscale_resize_keeps_the_parameters(ctx, picture, tmp_path):
    src = tmp_path / "with-info.png"
    from ldm.metadata import save_png

    save_png(Image.open(picture), src, "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32")
    out = streaming.run(tasks.upscale(ctx, image=str(src), method="bicubic", scale=2))
    with Image.open(out.images[0]) as im:
        assert im.size == (64, 64) and im.info["parameters"].startswith("a cat")


def test_upscale_hires_fix_and_x4_model(ctx, picture, upscale_pipe):
    out = streaming.run(tasks.upscale(ctx, image=str(picture), method="hires fix", scale=1.5, steps=2, seed=1, strength=0.5))
    with Image.open(out.images[0]) as im:
        assert im.size == (48, 48)
    with pytest.raises(tasks.Unavailable, match="--upscale-model"):
        tasks.upscale(ctx, image=str(picture), method="x4 model")
    ctx.pipes.upscale = upscale_pipe
    out = streaming.run(tasks.upscale(ctx, image=str(picture), method="x4 model", steps=2, seed=1, tile_size=0))
    with Image.open(out.images[0]) as im:
        assert im.size == (128, 128)
    with pytest.raises(ValueError, match="unknown upscale method"):
        tasks.upscale(ctx, image=str(picture), method="magic")


# ---- stop -----------------------------------------------------------------------------------


def test_stop_cancels_at_the_next_step_and_keeps_finished_batches(ctx):
    seen: list[streaming.Step] = []
    out = None
    for item in tasks.txt2img(ctx, prompt="x", steps=30, seed=1, batch_count=3, session="s1"):
        if isinstance(item, streaming.Step):
            seen.append(item)
            if item.batch == 1 and ctx.jobs.active():
                assert ctx.jobs.cancel("s1") == 1 and ctx.jobs.cancel("other") == 0
        else:
            out = item
    assert out.stopped and len(out.images) == 1  # batch 0 finished; batch 1 stopped early
    assert max(s.step for s in seen if s.batch == 1) < 30
    assert ctx.jobs.cancel("s1") == 0 and ctx.jobs.active() == 0  # the run unregistered itself


def test_stop_returns_once_the_run_has_yielded_its_last_step(ctx):
    """The Stop button's wait (Jobs.stop): when it returns, the run has left its step loop, so no progress
    message can follow (and overwrite) the "Stopped." it reports."""
    items: list = []

    def consume():  # appends each item as the run yields it
        for item in tasks.txt2img(ctx, prompt="x", steps=200, seed=1, session="s2"):
            items.append(item)

    def steps() -> int:
        return sum(isinstance(i, streaming.Step) for i in list(items))

    worker = threading.Thread(target=consume)
    worker.start()
    deadline = time.monotonic() + 120
    while not steps():
        assert time.monotonic() < deadline, "the run never reported a step"
        time.sleep(0.01)
    assert ctx.jobs.stop("s2", 60) == 1
    at_stop = steps()
    worker.join(60)
    assert steps() == at_stop < 200
    assert isinstance(items[-1], streaming.Output) and items[-1].stopped
    started = time.monotonic()
    assert ctx.jobs.stop("s2", 30) == 0 and time.monotonic() - started < 5  # nothing running: no wait


def test_a_stream_nobody_reads_is_abandoned():
    flag = threading.Event()

    def slow(callback):
        for i in range(1, 1000):
            time.sleep(0.01)
            if callback(i, 1000, np.zeros(1)):
                return "stopped"

    gen = streaming.stream_call(slow, flag, preview_every=0, abandon_after=0.3)
    assert isinstance(next(gen), streaming.Step)
    time.sleep(0.6)  # the consumer went away without closing the generator
    assert flag.is_set()


def test_closed_stream_sets_the_cancel_flag():
    flag = threading.Event()
    release = threading.Event()

    def slow(callback):
        for i in range(1, 1000):
            time.sleep(0.01)
            if callback(i, 1000, np.zeros(1)):
                release.set()
                raise RuntimeError("cancelled")

    gen = streaming.stream_call(slow, flag, preview_every=0)
    assert isinstance(next(gen), streaming.Step)
    gen.close()  # what a closed browser tab amounts to
    assert flag.is_set() and release.wait(5)


# ---- PNG info, send-to ----------------------------------------------------------------------


def test_png_info_and_send_to_txt2img(ctx, picture):
    out = streaming.run(tasks.txt2img(ctx, prompt="a (red:1.2) circle", negative_prompt="blurry", steps=3, seed=42,
                          sampler="Euler a", clip_skip=2))
    text = tasks.png_info(ctx, out.images[0])
    assert text == out.infotexts[0]
    fields = convert.infotext_fields(text)
    assert fields == {"prompt": "a (red:1.2) circle", "negative_prompt": "blurry", "steps": 3, "guidance_scale": 7.0,
                      "seed": 42, "sampler": "Euler a", "schedule": "Automatic", "clip_skip": 2, "width": 32, "height": 32}
    assert tasks.png_info(ctx, str(picture)) == ""  # none: "" for API clients (the page's placeholder says so)
    assert convert.infotext_fields("") == {} and tasks.png_info(ctx, None) == ""


def test_old_combined_sampler_names_are_split():
    fields = convert.infotext_fields("x\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (fields["sampler"], fields["schedule"]) == ("DPM++ 2M", "Karras")
    fields = convert.infotext_fields("x\nSteps: 20, Sampler: Nonexistent, CFG scale: 7, Seed: 1, Size: 512x512")
    assert "sampler" not in fields and fields["steps"] == 20


def test_send_to_picks_the_selected_image():
    gallery = [("/a.png", None), ("/b.png", "caption")]
    assert convert.selected_image(gallery, 1) == "/b.png"
    assert convert.selected_image(gallery, 7) == "/a.png"  # stale index: the first
    assert convert.selected_image([{"image": {"path": "/c.png"}, "caption": None}], 0) == "/c.png"
    assert convert.selected_image([], 0) is None
    assert convert.selected([5, 6], 1) == 6 and convert.selected([], 0, -1) == -1


# ---- file names and saving ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "a\x00b/c\\d:e", "x" * 10_000, "", "🙂 日本語", "con"])
def test_safe_file_names(prompt, tmp_path):
    name = saving.safe_filename(12, 3, prompt)
    assert name.startswith("00012-3-") and name.endswith(".png")
    assert "/" not in name and "\\" not in name and "\x00" not in name and ".." not in name
    assert len(name) <= 90
    saver = saving.Saver(tmp_path)
    path, warning = saver.save(Image.new("RGB", (8, 8)), "p", seed=3, prompt=prompt, task="txt2img")
    assert warning is None and Path(path).parent == tmp_path / "txt2img"


def test_numbering_continues_after_existing_files(tmp_path):
    (tmp_path / "txt2img").mkdir()
    (tmp_path / "txt2img" / "00041-1-old.png").write_bytes(b"")
    saver = saving.Saver(tmp_path)
    path, _ = saver.save(Image.new("RGB", (8, 8)), "p", seed=5, prompt="new", task="txt2img")
    assert Path(path).name == "00042-5-new.png"


def test_save_failure_still_returns_the_image_with_a_warning(base_pipe, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outputs folder should be")
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=blocker / "outputs"))
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, seed=1))
    assert len(out.warnings) == 1 and "could not save" in out.warnings[0]
    with Image.open(out.images[0]) as im:  # a temp PNG, still carrying its parameters
        assert im.info["parameters"] == out.infotexts[0]
    assert not (blocker / "outputs").exists()


def test_no_save_writes_temp_pngs(base_pipe, tmp_path):
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=None))
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, seed=1))
    assert not out.warnings and Path(out.images[0]).is_file() and not (tmp_path / "outputs").exists()


def test_status_lines():
    assert streaming.progress_text(streaming.Step(5, 20), 2.0) == "Step 5/20 · 2.0 s, ~6.0 s left"
    assert (streaming.progress_text(streaming.Step(10, 20, batch=1, batch_count=2), 30.0)
            == "Step 10/20 · batch 2/2 · 30 s, ~10 s left")
    assert streaming.done_text(streaming.Output(["a"], ["i"], [1], stopped=True), 200) == "Stopped: 1 image in 3 min"


def test_as_int():
    assert convert.as_int("steps", 20.0) == 20 and convert.as_int("seed", "-1") == -1
    for bad in (2.5, True, None, "x"):
        with pytest.raises(ValueError):
            convert.as_int("steps", bad)


def test_a_dedicated_inpainting_model_is_used_for_inpaint_and_outpaint(base_pipe, tmp_path, picture):
    import ldm

    folder = tiny.save_model(tmp_path / "tiny-inpaint", unet_model=tiny.unet(seed=1, in_channels=9),
                             pipeline_class="StableDiffusionInpaintPipeline")
    inpaint_pipe = ldm.load(folder, device="cpu", dtype="float32")
    ctx = state.Context(state.Pipes(base_pipe, inpaint=inpaint_pipe), state.Options(outputs=None))
    out = streaming.run(tasks.inpaint(ctx, image=str(picture), mask=square_mask(), steps=2, seed=1, mask_blur=0))
    assert "Model: tiny-inpaint" in out.infotexts[0]
    out = streaming.run(tasks.outpaint(ctx, image=str(picture), top=8, steps=2, seed=1))
    assert "Model: tiny-inpaint" in out.infotexts[0]

