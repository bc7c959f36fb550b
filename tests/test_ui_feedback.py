"""Handler side of issue 17 items 1, 2, 4: finished batches are yielded as they finish, a failed run
ends with a "Failed: ..." status (never "Done"), and UI-only steps explain their errors."""
from __future__ import annotations

import gradio as gr
import pytest

from ui import editor, endpoints, errors, state, streaming, tasks


@pytest.fixture
def ctx(base_pipe, tmp_path):
    return state.Context(state.Pipes(base_pipe), state.Options(outputs=tmp_path / "outputs", preview_every=0))


def test_each_finished_batch_is_yielded_before_the_next_starts(ctx):
    items = list(tasks.txt2img(ctx, prompt="x", steps=2, seed=3, batch_count=3, width=32, height=32))
    outs = [i for i in items if isinstance(i, streaming.Output)]
    assert [len(o.images) for o in outs] == [1, 2, 3] and [o.partial for o in outs] == [True, True, False]
    assert streaming.done_text(outs[0], 1.0).startswith("Running: 1 image") and outs[-1].seeds == [3, 4, 5]


@pytest.mark.parametrize("bad, message", [({"width": 7}, "width 7 is not a multiple of 8"),
                                          ({"width": 0}, "width 0 is out of range"),
                                          ({"steps": 0}, "steps must be a whole number from 1")])
def test_a_failed_run_says_failed_next_to_the_action_and_raises_plainly(ctx, bad, message):
    fn = endpoints.endpoint(ctx, tasks.txt2img)
    names = [p.name for p in endpoints.api_params(tasks.txt2img)]
    values = {"prompt": "it's", "steps": 2, "width": 32, "height": 32, **bad}
    args = [values.get(n, p.default) for n, p in zip(names, endpoints.api_params(tasks.txt2img))]
    seen = []
    with pytest.raises(gr.Error) as err:
        for item in fn(*args, None, lambda *a, **k: None):
            seen.append(item[3])
    assert seen[0] == "Running…" and seen[-1].startswith("Failed: ") and message in seen[-1]
    assert not any(s.startswith("Done") for s in seen)
    assert message in err.value.message and "&" not in err.value.message  # plain text for API clients


def test_ui_only_steps_explain_their_errors():
    why = errors.explain(editor.editor_to_image_and_mask)
    assert why(None, None) == "Failed: no image: upload one in the inpaint editor first"
    assert errors.message(gr.Error("no &#x27;x&#x27;")) == "no 'x'"


def test_a_plain_resize_records_what_it_did_as_a1111(ctx, tmp_path):
    """Issue 17 item 9: original parameters kept (Size now the new size) plus a `postprocessing` chunk."""
    from PIL import Image

    from ldm import metadata

    src = metadata.save_png(Image.new("RGB", (32, 16)), tmp_path / "in.png",
                            "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x16, Model: m")
    out = streaming.run(tasks.upscale(ctx, image=str(src), method="lanczos", scale=2))
    with Image.open(out.images[0]) as im:
        assert im.size == (64, 32)
        assert im.info["parameters"] == "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x32, Model: m"
        assert im.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert out.info == im.info["parameters"]
