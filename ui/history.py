"""The History tab: every image in the user's outputs folder (UI and REST API alike), newest first,
paged, searchable by prompt text, with its infotext, send-to buttons and a delete that asks first.

It reads the disk on every visit (so it survives reloads and restarts); the infotext of a file is
read once per modification time. With per-user outputs (several --auth users) a user's history is
their own folder only (`Saver.root`); a delete is refused for any file outside it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from ldm import metadata

from .endpoints import user_of
from .errors import readable
from .saving import IMAGE_SUFFIXES, Saver

PER_PAGE = 24


@dataclass(frozen=True)
class Entry:
    path: Path
    infotext: str
    mtime: float


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]  # this page's
    page: int  # 0-based, clamped to the pages there are
    pages: int
    total: int  # matching images over all pages


class History:
    """A user's saved images as the Saver wrote them (any task, any format)."""

    def __init__(self, saver: Saver) -> None:
        self.saver = saver
        self._infotexts: dict[Path, tuple[int, str]] = {}  # path -> (mtime_ns, infotext)
        self._lock = threading.Lock()

    def entries(self, user: str | None, query: str = "") -> list[Entry]:
        """Newest first; `query`: words that must all appear in the infotext (any case)."""
        root = self.saver.root(user)
        if root is None or not root.is_dir():
            return []
        words = query.lower().split()
        found = []
        for path in root.rglob("*"):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.is_symlink():
                continue
            try:
                stat = path.stat()
            except OSError:  # deleted meanwhile
                continue
            text = self._infotext(path, stat.st_mtime_ns)
            if all(w in text.lower() for w in words):
                found.append(Entry(path, text, stat.st_mtime))
        found.sort(key=lambda e: (e.mtime, e.path.name), reverse=True)
        return found

    def page(self, user: str | None, query: str = "", page: int = 0, per_page: int = PER_PAGE) -> Listing:
        found = self.entries(user, query)
        pages = max(1, -(-len(found) // per_page))
        page = min(max(0, int(page)), pages - 1)
        return Listing(found[page * per_page:(page + 1) * per_page], page, pages, len(found))

    def delete(self, user: str | None, path: str | Path) -> Path:
        """Remove one saved image of `user`'s; anything else (outside their folder, not an image) is refused."""
        root = self.saver.root(user)
        target = Path(path)
        if root is None or target.is_symlink() or not target.resolve().is_relative_to(root.resolve()):
            raise ValueError("that file is not one of your saved images")
        if target.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError("only saved images can be deleted here")
        try:
            target.unlink()
        except FileNotFoundError:
            raise ValueError(f"{target.name} is already gone") from None
        with self._lock:
            self._infotexts.pop(target, None)
        return target

    def _infotext(self, path: Path, mtime_ns: int) -> str:
        with self._lock:
            cached = self._infotexts.get(path)
        if cached and cached[0] == mtime_ns:
            return cached[1]
        try:
            with Image.open(path) as image:
                text = metadata.read_infotext(image) or ""
        except (OSError, ValueError, SyntaxError):  # unreadable or half-written: listed without text
            text = ""
        with self._lock:
            self._infotexts[path] = (mtime_ns, text)
        return text


# ---- the tab ----------------------------------------------------------------------------------


@dataclass
class HistoryPanel:
    """The History tab's widgets. gallery/index/infotexts/status/send_* are named as in
    `ui.widgets.Results`, so the tabs' send-to wiring serves this gallery too."""

    search: gr.Textbox
    refresh: gr.Button
    gallery: gr.Gallery
    prev: gr.Button
    next: gr.Button
    page_label: gr.Markdown
    info: gr.Textbox
    status: gr.Textbox
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_upscale: gr.Button
    delete: gr.Button
    confirm_row: gr.Row
    confirm_text: gr.Markdown
    confirm: gr.Button
    cancel: gr.Button
    paths: gr.State  # the files on disk behind the gallery (the gallery shows served copies)
    infotexts: gr.State
    index: gr.State
    page: gr.State


def history_panel() -> HistoryPanel:
    with gr.Row(equal_height=True):
        search = gr.Textbox(label="Search prompts", placeholder="words from the prompt, e.g. red circle", scale=4,
                            elem_id="history-search")
        refresh = gr.Button("Refresh", scale=0, min_width=90, elem_id="history-refresh")
    gallery = gr.Gallery(label="Saved images, newest first", format="png", columns=6, height=480, interactive=False,
                         elem_id="history-gallery", buttons=["download", "fullscreen"])
    with gr.Row(equal_height=True):
        prev = gr.Button("◀ Newer", size="sm", scale=0, min_width=100, elem_id="history-prev")
        page_label = gr.Markdown("", elem_id="history-page")
        nxt = gr.Button("Older ▶", size="sm", scale=0, min_width=100, elem_id="history-next")
    info = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False, buttons=["copy"],
                      elem_id="history-info")
    status = gr.Textbox(value="", show_label=False, interactive=False, container=False, elem_id="history-status")
    with gr.Row():
        send = [gr.Button(f"Send to {t}", size="sm", elem_id=f"history-send-{t}") for t in ("img2img", "inpaint", "upscale")]
        delete = gr.Button("Delete…", size="sm", variant="stop", elem_id="history-delete")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown("")
        confirm = gr.Button("Delete the file", variant="stop", size="sm", scale=0, elem_id="history-confirm-delete")
        cancel = gr.Button("Keep it", size="sm", scale=0, elem_id="history-cancel-delete")
    return HistoryPanel(search, refresh, gallery, prev, nxt, page_label, info, status, *send, delete, confirm_row,
                        confirm_text, confirm, cancel, gr.State([]), gr.State([]), gr.State(None), gr.State(0))


def wire_history(history: History, panel: HistoryPanel, tab: gr.Tab) -> None:
    p = panel
    shown = [p.gallery, p.paths, p.infotexts, p.index, p.info, p.page_label, p.page, p.status, p.confirm_row]

    def show(query: str, page: int, request: gr.Request):
        user = user_of(request)
        if history.saver.root(user) is None:
            text = "Nothing is saved (--no-save)." if history.saver.folder is None else "Log in to see your images."
            return [], [], [], None, "", text, 0, "", gr.Row(visible=False)
        listing = history.page(user, query or "", page)
        if listing.total:
            label = f"Page {listing.page + 1} of {listing.pages} · {listing.total} image(s)"
        elif query and query.strip():
            label = f"No saved image matches “{query.strip()}”."
        else:
            label = "No saved images yet: everything you generate (here or through the API) appears here."
        paths = [str(e.path) for e in listing.entries]
        texts = [e.infotext for e in listing.entries]
        return (paths, paths, texts, None, "", label, listing.page, "", gr.Row(visible=False))

    def step(delta: int):
        def move(query: str, page: int, request: gr.Request):
            return show(query, int(page or 0) + delta, request)
        return move

    def first_page(query: str, _page: int, request: gr.Request):
        return show(query, 0, request)

    for event, fn in ((tab.select, step(0)), (p.refresh.click, step(0)), (p.search.submit, first_page),
                      (p.prev.click, step(-1)), (p.next.click, step(1))):
        event(readable(fn), [p.search, p.page], shown, queue=False, api_visibility="private")

    def on_select(paths: list, texts: list, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) and 0 <= evt.index < len(paths) else None
        return i, (texts[i] if i is not None else ""), gr.Row(visible=False)

    p.gallery.select(readable(on_select), [p.paths, p.infotexts], [p.index, p.info, p.confirm_row], queue=False,
                     api_visibility="private")

    def ask(paths: list, index):
        if index is None or not 0 <= index < len(paths):
            return gr.Row(visible=False), "", "Failed: select an image to delete first"
        return gr.Row(visible=True), f"Delete **{Path(paths[index]).name}** from disk? This cannot be undone.", ""

    p.delete.click(readable(ask), [p.paths, p.index], [p.confirm_row, p.confirm_text, p.status], queue=False,
                   api_visibility="private")
    p.cancel.click(readable(lambda: gr.Row(visible=False)), None, p.confirm_row, queue=False, api_visibility="private")

    def delete(paths: list, index, query: str, page: int, request: gr.Request):
        if index is None or not 0 <= index < len(paths):
            return (*[gr.skip()] * 7, "Failed: select an image to delete first", gr.Row(visible=False))
        try:
            gone = history.delete(user_of(request), paths[index])
        except ValueError as exc:
            return (*[gr.skip()] * 7, f"Failed: {exc}", gr.Row(visible=False))
        *values, _status, row = show(query, page, request)
        return (*values, f"Deleted {gone.name}.", row)

    p.confirm.click(readable(delete), [p.paths, p.index, p.search, p.page], shown, queue=False, api_visibility="private")
