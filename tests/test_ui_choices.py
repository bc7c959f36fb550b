"""The UI's choices and ranges are ldm's tables and the loaded pipeline's limits, never copies."""
from __future__ import annotations

import pytest

import ldm
import tiny
from ldm.masks import InpaintArea, MaskedContent
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
        for side in ("width", "height"):
            slider = one(demo, elem_id=f"{tab}-{side}")
            assert (slider.maximum, slider.step) == (limits.max_size, limits.size_step)
            assert slider.minimum == (limits.size_step if tab == "txt2img" else 0)  # 0 = the image's size
        assert one(demo, elem_id=f"{tab}-batch-size").maximum == limits.max_batch
    clip_skips = components(demo, label="Clip skip")
    assert len(clip_skips) == 3 and {s.maximum for s in clip_skips} == {limits.max_clip_skip}
    assert [value for _, value in one(demo, label="Hires fix upscaler").choices] == list(ldm.HIRES_UPSCALERS)
    noise = one(demo, label="Noise level (x4 model)")
    assert noise.visible is False  # only the x4 model reads it, and none is loaded
    assert [value for _, value in one(demo, label="Method").choices] == [choices.UPSCALE_HIRES, *ldm.RESAMPLERS]


def test_noise_level_follows_the_x4_model(base_pipe, x4_pipe, tmp_path):
    from ui import build
    from ui.state import Options, Pipes

    demo = build(Pipes(base_pipe, upscale=x4_pipe), Options(outputs=tmp_path))
    noise = one(demo, label="Noise level (x4 model)")
    assert noise.maximum == x4_pipe.max_noise_level == 250 and noise.visible is not False
    assert [value for _, value in one(demo, label="Method").choices][0] == choices.UPSCALE_X4
