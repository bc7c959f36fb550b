from PIL import Image

from ldm.metadata import format_infotext, infotext_to_kwargs, parse_infotext, read_infotext, save_png


def test_format_matches_a1111_layout():
    text = format_infotext("a cat", "blurry", {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                                                "CFG scale": 7, "Seed": 123, "Size": "512x512", "Model hash": "abcd1234ef",
                                                "Model": "sd15", "Clip skip": None, "Version": "ldm 0.1.0"})
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
                    "Seed: 123, Size: 512x512, Model hash: abcd1234ef, Model: sd15, Version: ldm 0.1.0")


def test_empty_negative_line_is_omitted_and_values_quoted():
    text = format_infotext("p", "", {"Steps": 5, "Sampler": "Euler", "Model": "my, model: v2", "Seed": 1})
    assert "Negative prompt" not in text
    assert 'Model: "my, model: v2"' in text


def test_round_trip_through_png(tmp_path, base_pipe):
    r = base_pipe.txt2img("a (red:1.2) ball,\nsecond line", negative_prompt="ugly, \"bad\"", width=32, height=32,
                          steps=2, seed=77, clip_skip=2, sampler="DPM++ 2M Karras")
    path = save_png(r.images[0], tmp_path / "x.png", r.infotexts[0])
    info = parse_infotext(read_infotext(Image.open(path)))
    assert info["Prompt"] == "a (red:1.2) ball,\nsecond line"
    assert info["Negative prompt"] == 'ugly, "bad"'
    assert info["Steps"] == "2" and info["Seed"] == "77" and info["Sampler"] == "DPM++ 2M"
    assert info["Schedule type"] == "Karras" and info["Clip skip"] == "2" and info["Size"] == "32x32"
    kwargs = infotext_to_kwargs(info)
    assert kwargs["seed"] == 77 and kwargs["width"] == 32 and kwargs["clip_skip"] == 2 and kwargs["guidance_scale"] == 7.0
    again = base_pipe.txt2img(**kwargs)
    assert again.infotexts[0] == r.infotexts[0]
