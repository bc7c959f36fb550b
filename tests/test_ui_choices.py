"""The UI's choices and ranges are ldm's tables and the loaded pipeline's limits, never copies."""
from __future__ import annotations

import pytest

import ldm
import tiny
from ldm.masks import InpaintArea, MaskedContent
from ldm.params import GUIDANCE, HIRES_SCALE, REFINER_SWITCH, STRENGTH
from ui import choices

pytest.importorskip("gradio")


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


# The UI's own ranges over values ldm takes with no upper bound: Gradio's range check stays the server's
# bound there (an outpaint side of 10**6 pixels would be allocated before ldm's size check).
UI_RANGES = {"Mask blur", "Only masked padding, pixels", "Left, pixels", "Right, pixels", "Top, pixels",
             "Bottom, pixels", "Tile size (0 = auto)", "Tile overlap", "Brush radius, px (of the picture)"}


def test_every_slider_ldm_checks_lets_typed_values_reach_ldm(base_pipe, tmp_path):
    """Gradio's Slider sets a typed value to its range without a word; every slider whose values ldm (or a
    handler) checks passes them on instead (ui.ranges), so its message says what is allowed."""
    from ui import build
    from ui.gradio_compat import LIBRARY_RANGE
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe), Options(outputs=tmp_path))
    sliders = [b for b in demo.blocks.values() if type(b).__name__ == "Slider"]
    checked = [s for s in sliders if s.label not in UI_RANGES]
    assert {s.label for s in sliders} >= UI_RANGES
    assert len(checked) > 30  # sizes, steps, CFG, batch, clip skip, strengths, hires, ControlNet units, ...
    for s in sliders:
        assert (LIBRARY_RANGE in (s.elem_classes or [])) == (s.label not in UI_RANGES), s.label
    over = base_pipe.limits.max_steps + 1
    assert one(demo, elem_id="txt2img-steps").preprocess(over) == over  # for ldm to refuse, with its message
    for s in components(demo, label="Denoising strength"):
        assert (s.minimum, s.maximum) == (STRENGTH.low + s.step, STRENGTH.high)  # ldm: 0 < strength <= 1
    assert (one(demo, elem_id="txt2img-hires-scale").minimum, one(demo, elem_id="txt2img-refiner-switch-at").maximum) \
        == (HIRES_SCALE.low, REFINER_SWITCH.high - 0.01)


def test_noise_level_follows_the_x4_model(base_pipe, x4_pipe, tmp_path):
    from ui import build
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe, upscale=x4_pipe), Options(outputs=tmp_path))
    noise = one(demo, label="Noise level (x4 model)")
    assert noise.maximum == x4_pipe.max_noise_level == 250 and noise.visible is not False
    assert [value for _, value in one(demo, label="Method").choices][0] == choices.UPSCALE_X4
