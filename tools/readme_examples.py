"""Regenerate the example pictures in the README with the bundled demo model.

    python tools/readme_examples.py      # writes docs/images/*.png
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm.metadata import save_png  # noqa: E402

OUT = ROOT / "docs" / "images"
ZOOM = 4  # the demo model works at 64 px; enlarge (nearest) so the pictures are visible


def show(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = ldm.load(ROOT / "weights" / "demo", device="cpu")
    prompts = ["a red circle on a blue background", "a yellow triangle on a black background",
               "a green square on a white background", "a purple circle on an orange background"]
    row = Image.new("RGB", (64 * len(prompts), 64))
    for i, prompt in enumerate(prompts):
        r = pipe.txt2img(prompt, steps=20, seed=1, sampler="Euler a")
        row.paste(r.images[0], (64 * i, 0))
    show(row).save(OUT / "txt2img.png")

    before = pipe.txt2img("a red circle on a blue background", steps=20, seed=3, sampler="Euler a")
    image = before.images[0]
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 56, 56), fill=255)
    after = pipe.inpaint(image, mask, "a yellow square on a blue background", steps=20, seed=3, sampler="Euler a",
                         mask_blur=2)
    save_png(after.images[0], OUT / "inpaint-after-64.png", after.infotexts[0])
    strip = Image.new("RGB", (64 * 3, 64), (255, 255, 255))
    strip.paste(image, (0, 0))
    strip.paste(Image.merge("RGB", [mask] * 3), (64, 0))
    strip.paste(after.images[0], (128, 0))
    show(strip).save(OUT / "inpaint.png")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
