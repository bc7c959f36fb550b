"""The UI's choices and ranges are ldm's tables and the loaded pipeline's limits, never copies."""
from __future__ import annotations

import pytest

import ldm
import tiny
from ldm.masks import InpaintArea, MaskedContent
from ldm.params import (AUTO_TILE_OVERLAP, GUIDANCE, HIRES_SCALE, INPAINT_PADDING, MASK_BLUR, OUTPAINT_SIDE,
                        REFINER_SWITCH, STRENGTH, TILE_OVERLAP, UPSCALE_TILE)
from ui import brush, choices

gr = pytest.importorskip("gradio")


def test_choice_lists_are_ldm_lists():
    assert choices.RESIZE_METHODS == tuple(ldm.RESAMPLERS)
    assert choices.UPSCALE_METHODS == [choices.UPSCALE_X4, choices.UPSCALE_HIRES, *ldm.RESAMPLERS]
    assert sorted(value for _, value in choices.INPAINT_AREAS) == sorted(a.value for a in InpaintArea)
    assert sorted(value for _, value in choices.MASKED_CONTENT) == sorted(m.value for m in MaskedContent)
    assert choices.samplers_list() == ldm.samplers.sampler_names()


@pytest.fixture(scope="module")
def x4_pipe(tmp_path_factory):
    folder = tiny.save_upscaler(tmp_path_factory.mktemp("tiny-x4-choices"), max_noise_level=250)
    return ldm.load(folder, device="cpu", dtype="float32")


def components(demo, **attrs) -> list:
    return [b for b in demo.blocks.values() if all(getattr(b, k, None) == v for k, v in attrs.items())]


def one(demo, **attrs):
    found = components(demo, **attrs)
    assert len(found) == 1, (attrs, found)
    return found[0]


def test_sliders_follow_the_loaded_pipeline(base_pipe, tmp_path):
    from ui import build
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe), Options(outputs=tmp_path))
    limits = base_pipe.limits
    for tab in ("txt2img", "img2img", "inpaint"):
        for side in ("width", "height"):  # one rule on every tab: ldm's sizes, from the size step
            slider = one(demo, elem_id=f"{tab}-{side}")
            allowed = limits.range(side)
            assert (slider.minimum, slider.maximum, slider.step) == (allowed.low, allowed.high, limits.size_step)
            assert slider.value == (base_pipe.default_size if tab == "txt2img" else 0)  # 0 = the image's size
        assert one(demo, elem_id=f"{tab}-batch-size").maximum == limits.max_batch
        steps = one(demo, elem_id=f"{tab}-steps")
        assert (steps.minimum, steps.maximum) == (limits.range("steps").low, min(150, limits.max_steps))
        cfg = one(demo, elem_id=f"{tab}-cfg")
        assert (cfg.minimum, cfg.maximum) == (GUIDANCE.low, min(30, GUIDANCE.high))
    clip_skips = components(demo, label="Clip skip")
    assert len(clip_skips) == 3 and {s.maximum for s in clip_skips} == {limits.max_clip_skip}
    assert [value for _, value in one(demo, label="Hires fix upscaler").choices] == list(ldm.HIRES_UPSCALERS)
    noise = one(demo, label="Noise level (x4 model)")
    assert noise.visible is False  # only the x4 model reads it, and none is loaded
    assert [value for _, value in one(demo, label="Method").choices] == [choices.UPSCALE_HIRES, *ldm.RESAMPLERS]


def test_every_slider_lets_typed_values_reach_the_rule_that_checks_them(base_pipe, x4_pipe, tmp_path):
    """Gradio's Slider sets a typed value to its range without a word; every slider on the page passes typed
    values on instead (ui.ranges), so ldm's check (or, for the brush, ui.brush's) says what is allowed."""
    from ui import build
    from ui.gradio_compat import LIBRARY_RANGE
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe, upscale=x4_pipe), Options(outputs=tmp_path))
    sliders = [b for b in demo.blocks.values() if isinstance(b, gr.Slider)]
    assert len(sliders) > 40  # sizes, steps, CFG, batch, strengths, hires, inpaint, outpaint, x4 tiles, ControlNet, ...
    for s in sliders:
        assert LIBRARY_RANGE in (s.elem_classes or []), s.label
    over = base_pipe.limits.max_steps + 1
    assert one(demo, elem_id="txt2img-steps").preprocess(over) == over  # for ldm to refuse, with its message
    for s in components(demo, label="Denoising strength"):
        assert (s.minimum, s.maximum) == (STRENGTH.low + s.step, STRENGTH.high)  # ldm: 0 < strength <= 1
    assert (one(demo, elem_id="txt2img-hires-scale").minimum, one(demo, elem_id="txt2img-refiner-switch-at").maximum) \
        == (HIRES_SCALE.low, REFINER_SWITCH.high - 0.01)
    # The inpaint, outpaint and x4 ones start where ldm's ranges start (the tile size at 0: automatic); their
    # tracks end where A1111's do, and past that a typed value reaches ldm (which takes 300 px of padding).
    for elem_id, allowed in (("inpaint-mask-blur", MASK_BLUR), ("inpaint-padding", INPAINT_PADDING),
                             ("outpaint-left", OUTPAINT_SIDE), ("upscale-tile-overlap", TILE_OVERLAP)):
        s = one(demo, elem_id=elem_id)
        assert s.minimum == allowed.low and s.maximum <= allowed.high and s.preprocess(s.maximum + 1) == s.maximum + 1
    assert one(demo, elem_id="upscale-tile-size").minimum == 0 < UPSCALE_TILE.low
    # ldm lowers a larger overlap for the tiles it picks (tile size 0): the field says so, from ldm's table.
    assert f"With tile size 0, at most {AUTO_TILE_OVERLAP:.0%} of the tile" in one(demo, elem_id="upscale-tile-overlap").info
    assert one(demo, elem_id="inpaint-brush-size").preprocess(brush.MAX_SIZE + 1) == brush.MAX_SIZE + 1


def test_noise_level_follows_the_x4_model(base_pipe, x4_pipe, tmp_path):
    from ui import build
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe, upscale=x4_pipe), Options(outputs=tmp_path))
    noise = one(demo, label="Noise level (x4 model)")
    assert noise.maximum == x4_pipe.max_noise_level == 250 and noise.visible is not False
    assert [value for _, value in one(demo, label="Method").choices][0] == choices.UPSCALE_X4
