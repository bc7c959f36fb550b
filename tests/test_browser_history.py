"""The History tab (issue 17 item 5): every image saved by the UI or the REST API, newest first, with
its infotext, search, send-to and a confirmed delete; per user when the app has several users.
Headless Chromium on the tiny model, two users logged in in two browser contexts.
"""
from __future__ import annotations

import base64
import http.client
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import free_port

pytestmark = pytest.mark.browser

USERS = [("alice", "alice-pw"), ("bob", "bob-pw")]


@pytest.fixture(scope="module")
def app(base_pipe, tmp_path_factory):
    from ui import build, sdapi
    from ui.security import launch_kwargs
    from ui.state import Options, Pipes

    outputs = tmp_path_factory.mktemp("history-outputs")
    demo = build(Pipes(base_pipe), Options(outputs=outputs, preview_every=0, per_user_outputs=True))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(auth=USERS, max_upload_mb=20, outputs=outputs, per_user=True))
    sdapi.mount(demo.app, demo.ldm_context, sdapi.Settings(auth=USERS))
    yield {"url": f"http://127.0.0.1:{port}/", "port": port, "outputs": Path(outputs)}
    demo.close()


def login(browser, url: str, user: str, password: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("input[type=password]", timeout=60_000)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")
    page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
    return context, page


def open_history(page, expect: str) -> str:
    """Open the History tab and wait until its page line says `expect`."""
    page.get_by_role("tab", name="History").click()
    page.wait_for_function(f"document.querySelector('#history-page').innerText.includes({expect!r})", timeout=30_000)
    return page.inner_text("#history-page")


def wait_shown(page, n: int) -> None:
    """Until the gallery shows `n` different pictures (grid or preview mode alike)."""
    page.wait_for_function(
        "new Set([...document.querySelectorAll('#history-gallery img')].map(i => i.src)).size === %d" % n,
        timeout=30_000)


def pick(page, i: int) -> None:
    """Select the gallery's i-th picture and wait for its parameters."""
    page.locator("#history-gallery button.thumbnail-item").nth(i).click()
    page.wait_for_function("document.querySelector('#history-info textarea').value.length > 0", timeout=10_000)


def api_txt2img(port: int, user: str, password: str, prompt: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    body = json.dumps({"prompt": prompt, "steps": 2, "seed": 5, "save_images": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/sdapi/v1/txt2img", body=body,
                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:300]
    resp.read()
    conn.close()


def generate(page, prompt: str) -> None:
    page.get_by_role("tab", name="txt2img").click()
    page.fill("#txt2img-prompt textarea", prompt)
    box = page.locator("#txt2img-steps input[type=number]")
    box.fill("2")
    box.press("Enter")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('Done')",
                           timeout=120_000)


def test_history_lists_searches_sends_and_deletes_own_images_only(browser, app):
    alice_ctx, alice = login(browser, app["url"], *USERS[0])
    bob_ctx, bob = login(browser, app["url"], *USERS[1])
    try:
        open_history(alice, "No saved images yet")

        generate(alice, "a red circle")
        generate(alice, "a blue square")
        api_txt2img(app["port"], *USERS[0], "a green triangle from the api")
        api_txt2img(app["port"], *USERS[1], "bob's yellow circle")
        alice_files = sorted((app["outputs"] / "alice").rglob("*.png"))
        assert len(alice_files) == 3 and len(list((app["outputs"] / "bob").rglob("*.png"))) == 1

        # Newest first, UI and API alike, with the infotext of the selected image.
        open_history(alice, "3 image(s)")
        wait_shown(alice, 3)
        pick(alice, 0)
        assert alice.input_value("#history-info textarea").startswith("a green triangle from the api")

        # Search by prompt text.
        alice.fill("#history-search textarea, #history-search input", "blue")
        alice.press("#history-search textarea, #history-search input", "Enter")
        alice.wait_for_function("document.querySelector('#history-page').innerText.includes('1 image(s)')",
                                timeout=10_000)
        wait_shown(alice, 1)

        # Bob sees his own image only, and cannot fetch Alice's files by path.
        open_history(bob, "1 image(s)")
        wait_shown(bob, 1)
        pick(bob, 0)
        assert bob.input_value("#history-info textarea").startswith("bob's yellow circle")
        for ctx, expected in ((bob_ctx, 404), (alice_ctx, 200)):
            got = ctx.request.get(app["url"] + "gradio_api/file=" + quote(str(alice_files[0].resolve())))
            assert got.status == expected, (expected, got.status)

        # Survives a reload (read from disk), and send-to carries the prompt and the picture.
        alice.reload()
        alice.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
        open_history(alice, "3 image(s)")
        wait_shown(alice, 3)
        pick(alice, 1)  # the blue square
        alice.click("#history-send-img2img")
        alice.wait_for_function("document.querySelector('#img2img-prompt textarea')?.value === 'a blue square'",
                                timeout=10_000)
        alice.wait_for_selector("#img2img-image img", timeout=10_000)

        # Delete asks first; "Keep it" keeps the file, "Delete the file" removes it.
        open_history(alice, "3 image(s)")
        wait_shown(alice, 3)
        pick(alice, 1)
        assert alice.input_value("#history-info textarea").startswith("a blue square")
        alice.click("#history-delete")
        alice.wait_for_selector("#history-confirm-delete", state="visible", timeout=10_000)
        alice.click("#history-cancel-delete")
        alice.wait_for_selector("#history-confirm-delete", state="hidden", timeout=10_000)
        assert len(list((app["outputs"] / "alice").rglob("*.png"))) == 3
        alice.click("#history-delete")
        alice.click("#history-confirm-delete")
        alice.wait_for_function("document.querySelector('#history-status textarea').value.startsWith('Deleted')",
                                timeout=10_000)
        wait_shown(alice, 2)
        left = sorted((app["outputs"] / "alice").rglob("*.png"))
        assert len(left) == 2 and not any("blue-square" in p.name for p in left)
    finally:
        alice_ctx.close()
        bob_ctx.close()


def test_history_after_a_restart_reads_the_folder(tmp_path):
    """A new server (a new History over the same folder) lists what an earlier one saved, newest
    first, JPEG/WebP infotext included; it never deletes outside the user's folder."""
    from PIL import Image

    from ui.history import History
    from ui.saving import Saver

    image = Image.new("RGB", (16, 16), (200, 10, 10))
    first = Saver(tmp_path, per_user=True)
    first.save(image, "old red\nSteps: 2", seed=1, prompt="old red", task="txt2img", user="alice")
    time.sleep(0.05)
    Saver(tmp_path, per_user=True, save_format="webp").save(image, "new red\nSteps: 2", seed=2, prompt="new red",
                                                            task="txt2img", user="alice")
    Saver(tmp_path, per_user=True).save(image, "bob\nSteps: 2", seed=3, prompt="bob", task="txt2img", user="bob")
    history = History(Saver(tmp_path, per_user=True))
    assert [e.infotext.split("\n")[0] for e in history.entries("alice")] == ["new red", "old red"]
    assert [e.infotext.split("\n")[0] for e in history.entries("alice", "OLD")] == ["old red"]
    bob_file = history.entries("bob")[0].path
    with pytest.raises(ValueError, match="not one of your saved images"):
        history.delete("alice", bob_file)
    with pytest.raises(ValueError, match="not one of your saved images"):
        history.delete("alice", tmp_path / "alice" / ".." / "bob" / "txt2img" / bob_file.name)
    assert bob_file.exists()
    assert history.page("alice", per_page=1, page=5).page == 1  # clamped to the last page
