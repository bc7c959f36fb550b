"""app.py's model flags: every choice its parser offers is one ldm accepts, and a model loads with it.

The bug this pins: `app.py --attention chunked` was offered by the parser and refused by ldm.load,
so the app exited. The parser now reads ldm's own lists; these tests load through app.py's own
load function, as `python app.py` does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import app
import ldm
import tiny


def flag_choices(flag: str) -> list[str]:
    action = next(a for a in app.parser()._actions if flag in a.option_strings)
    assert action.choices, f"{flag} offers no choices"
    return list(action.choices)


def cpu_args(model, *flags: str) -> argparse.Namespace:
    # The models folder next to the model (a tmp folder), so the tests never create ./models in the checkout.
    models_dir = str(Path(model).parent / "models")
    return app.parse_args(["--model", str(model), "--device", "cpu", "--dtype", "float32", "--models-dir", models_dir, *flags])


@pytest.mark.parametrize("choice", flag_choices("--attention"))
def test_every_attention_choice_is_a_valid_option(choice):
    assert ldm.Options(attention=choice).validate().attention == choice


@pytest.mark.parametrize("choice", flag_choices("--offload"))
def test_every_offload_choice_is_a_valid_option(choice):
    assert ldm.Options(offload=choice).validate().offload == choice


@pytest.mark.parametrize("choice", [c for c in flag_choices("--attention") if c != "xformers"])
def test_the_app_loads_with_every_attention_choice_on_cpu(base_model, choice):
    pipe = app.load_model(str(base_model), cpu_args(base_model, "--attention", choice))
    assert pipe.options.attention == choice
    assert pipe.txt2img("x", steps=1, seed=1, width=32, height=32).images


@pytest.mark.parametrize("choice", flag_choices("--offload"))
def test_the_app_loads_with_every_offload_choice_on_cpu(base_model, choice):
    pipe = app.load_model(str(base_model), cpu_args(base_model, "--offload", choice))
    assert pipe.options.offload == choice


def test_xformers_on_cpu_exits_with_a_message(base_model):
    with pytest.raises(SystemExit) as exit_:
        app.load_model(str(base_model), cpu_args(base_model, "--attention", "xformers"))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "xformers" in message


def test_size_and_vae_tiling_flags_reach_the_pipeline_as_options(base_model):
    pipe = app.load_model(str(base_model), cpu_args(base_model, "--max-size", "256", "--vae-tiling"))
    assert pipe.options == ldm.Options(max_size=256, vae_tiling=True)
    assert pipe.limits.max_size == 256


def test_a_refused_option_exits_with_a_message(base_model):
    with pytest.raises(SystemExit) as exit_:
        app.load_model(str(base_model), cpu_args(base_model, "--max-size", "0"))
    assert str(exit_.value.code).startswith("error: max_size")


def test_no_model_is_no_pipeline(base_model):
    assert app.load_model(None, cpu_args(base_model)) is None


# ---- auth flags (issue 16 item 4): asking for auth and getting none is a start-up error ----------


@pytest.mark.parametrize("auth, lines", [(",", None), (" ", None), ("", None), (None, "# only a comment\n\n"),
                                         (None, ""), (" , ", "  \n")])
def test_auth_asked_for_but_empty_is_a_start_up_error(tmp_path, auth, lines):
    auth_file = None
    if lines is not None:
        auth_file = tmp_path / "users"
        auth_file.write_text(lines)
    with pytest.raises(SystemExit) as exit_:
        app.read_auth(auth, str(auth_file) if auth_file else None)
    assert "no user" in str(exit_.value.code)


def test_auth_entries_are_read_and_no_auth_is_no_auth(tmp_path):
    (tmp_path / "users").write_text("# team\nann:pw1\n\nbob:pw:2\n")
    assert app.read_auth("cy:x, dee:y", str(tmp_path / "users")) == [("cy", "x"), ("dee", "y"), ("ann", "pw1"), ("bob", "pw:2")]
    assert app.read_auth(None, None) == []


def test_prediction_type_flag_applies_to_the_start_up_model_only(base_model, tmp_path):
    assert flag_choices("--prediction-type") == ["auto", "epsilon", "v_prediction"]
    args = cpu_args(base_model, "--prediction-type", "v_prediction")
    assert app.load_model(str(base_model), args).scheduler_config["prediction_type"] == "v_prediction"
    other = tiny.save_model(tmp_path / "other")  # e.g. a checkpoint switched to later
    assert app.loader(args)(str(other)).scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    assert app.load_model(str(base_model), cpu_args(base_model)).scheduler_config.get("prediction_type", "epsilon") == "epsilon"
