"""Screenshots of every tab of the web UI on the demo model, for the docs.

    python tools/ui_screenshots.py                     # -> docs/images/ui-<tab>.png and docs/screenshot.png
    python tools/ui_screenshots.py --out /tmp/shots --steps 4

Starts the app in this process (demo model, outputs in a temporary folder), drives headless Chromium
through Playwright (Debian's /usr/bin/chromium by default): generates on txt2img, sends the picture to
img2img, inpaint (with a painted stroke) and upscale and runs each, reads it in PNG info, opens the
history, and saves one screenshot per tab. Rerun it after a UI change; tests/test_ui_screenshots.py
runs it too.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABS = ("txt2img", "img2img", "inpaint", "upscale", "png-info", "history")
PROMPT = "a red circle on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_done(page, tab: str, timeout: float = 300_000) -> None:
    page.wait_for_function(f"/^(Done|Failed)/.test(document.querySelector('#{tab}-status textarea').value)",
                           timeout=timeout)
    status = page.input_value(f"#{tab}-status textarea")
    if not status.startswith("Done"):
        raise SystemExit(f"{tab}: {status}")


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    time.sleep(0.3)


def paint_stroke(page) -> None:
    editor = page.locator("#inpaint-editor")
    box = editor.locator("canvas").first.bounding_box()
    side = min(box["width"], box["height"])
    x0, y0 = box["x"] + box["width"] / 2 - side * 0.25, box["y"] + box["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x0 + i * side * 0.05, y0 + (i % 2) * side * 0.03, steps=2)
    page.mouse.up()
    time.sleep(2)


def take(page, out: Path, steps: int, outputs: Path) -> list[Path]:
    shots = []

    def shoot(name: str) -> None:
        path = out / f"ui-{name}.png"
        time.sleep(0.5)
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)

    page.fill("#txt2img-prompt textarea", PROMPT)
    set_number(page, "txt2img-steps", steps)
    set_number(page, "txt2img-seed", 7)
    set_number(page, "txt2img-batch-size", 2)
    page.click("#txt2img-generate")
    wait_done(page, "txt2img")
    page.locator("#txt2img-gallery button.thumbnail-item").first.click()
    shoot("txt2img")

    page.get_by_role("button", name="Send to img2img").first.click()
    page.wait_for_selector("#img2img-image img", timeout=20_000)
    page.fill("#img2img-prompt textarea", "a red square on a blue background")
    page.click("#img2img-generate")
    wait_done(page, "img2img")
    shoot("img2img")

    page.get_by_role("tab", name="txt2img").click()
    page.get_by_role("button", name="Send to inpaint").first.click()
    page.locator("#inpaint-editor canvas").first.wait_for(timeout=30_000)
    page.fill("#inpaint-prompt textarea", "a yellow circle on a blue background")
    set_number(page, "inpaint-steps", steps)
    editor = page.locator("#inpaint-editor")
    for _ in range(10):  # a stroke made while the editor still loads the sent picture is not drawn: again
        time.sleep(2)
        before = editor.screenshot()
        paint_stroke(page)
        if editor.screenshot() != before:
            break
    page.click("#inpaint-generate")
    wait_done(page, "inpaint")
    shoot("inpaint")

    page.get_by_role("tab", name="txt2img").click()
    page.get_by_role("button", name="Send to upscale").first.click()
    page.wait_for_selector("#upscale-image img", timeout=20_000)
    page.click("#upscale-generate")
    wait_done(page, "upscale")
    shoot("upscale")

    page.get_by_role("tab", name="PNG info").click()
    first = sorted((outputs / "txt2img").glob("*.png"))[0]
    page.locator("#png-info-image input[type=file]").set_input_files(str(first))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.length > 0", timeout=20_000)
    shoot("png-info")

    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#history-page').innerText.includes('image(s)')", timeout=20_000)
    page.wait_for_selector("#history-gallery img", timeout=20_000)
    shoot("history")
    return shots


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "demo"))
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for ui-<tab>.png")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1400)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import ldm
    from playwright.sync_api import sync_playwright
    from ui import build
    from ui.state import Options, Pipes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    outputs = Path(tempfile.mkdtemp(prefix="ldm-shots-"))
    demo = build(Pipes(ldm.load(args.model, device="cpu", dtype="float32")), Options(outputs=outputs, preview_every=0))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium,
                                         args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
            shots = take(page, out, args.steps, outputs)
            browser.close()
    finally:
        demo.close()
        shutil.rmtree(outputs, ignore_errors=True)
    if out.resolve() == (ROOT / "docs" / "images").resolve():
        shutil.copyfile(out / "ui-txt2img.png", ROOT / "docs" / "screenshot.png")  # README's picture
    for path in shots:
        print(path)
    return shots


if __name__ == "__main__":
    main()
