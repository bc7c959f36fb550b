"""What the page adds to Gradio's: keyboard habits (A1111/ComfyUI) and a few styles.

* Ctrl+Enter (Cmd+Enter) in any prompt box clicks that tab's Generate button; Esc clicks its Stop
  button while that tab is running (its status line says "Running" or "Step").
* Tooltips (and accessible names) on the unlabelled 🎲 / ♻️ seed buttons and the models bar's 🔄.
* A generation click says "Queued" in the status line at once (`QUEUED_JS`).
* Sliders whose range the library checks (`gradio_compat.library_range`, `ui.ranges`) keep a typed
  value out of their range when their number box loses focus, where Gradio's Slider would set it to
  the range without a word: the value reaches `ldm`, which refuses it with its message.
* Gallery pictures are shown whole (`object-fit: contain`), not cropped to square tiles; a gallery's
  only picture fills the gallery's height instead of a square tile as wide as the column (Gradio 6.31),
  which is taller than the gallery and cut the picture's bottom off.
* On a narrow screen (a phone) the results come right after a tab's Generate/Stop row, before the
  settings: the inputs column (`ldm-inputs`) dissolves into the row and is reordered around the
  results column (`ldm-results`); `ldm-actions` marks the button row.

The element ids are the ones `ui.widgets` gives: `<tab>-prompt`, `<tab>-negative`, `<tab>-generate`,
`<tab>-stop`, `<tab>-status`, `<tab>-gallery`.
"""
from __future__ import annotations

from .gradio_compat import LIBRARY_RANGE

CSS = """
[id$="-gallery"] img { object-fit: contain !important; }
[id$="-gallery"] .grid-container:has(> .gallery-item:only-child) { height: 100%; }
[id$="-gallery"] .gallery-item:only-child > .thumbnail-item { aspect-ratio: auto; height: 100%; }
@media (max-width: 700px) {
  .ldm-inputs { display: contents !important; }
  .ldm-inputs > * { order: 0; flex: 1 1 100% !important; min-width: 100% !important; }
  .ldm-inputs > .ldm-actions ~ * { order: 2; }
  .ldm-results { order: 1; flex: 1 1 100% !important; min-width: 100% !important; }
}
"""

QUEUED_JS = "() => 'Queued: waiting for the model…'"  # a click's status until the run starts ("Running…")

KEYS_JS = """
<script>
(() => {
  const tabOf = (el) => {
    const box = el && el.closest && el.closest('[id$="-prompt"], [id$="-negative"]');
    return box ? box.id.replace(/-(prompt|negative)$/, '') : null;
  };
  const visible = (el) => el && el.offsetParent !== null;
  const TITLES = {'-random-seed': 'Random seed (-1: a new one each run)',
                  '-reuse-seed': 'Reuse the seed of the selected image',
                  'model-refresh': 'Rescan the models folder for checkpoints and VAEs'};
  const label = () => {
    for (const [suffix, title] of Object.entries(TITLES)) {
      for (const el of document.querySelectorAll('button[id$="' + suffix + '"]:not([title])')) {
        el.title = title;
        el.setAttribute('aria-label', title);
      }
    }
  };
  new MutationObserver(label).observe(document.documentElement, {childList: true, subtree: true});
  // Captured at the document, the blur never reaches the slider's own handler, which clamps.
  document.addEventListener('blur', (e) => {
    if (e.target.matches && e.target.matches('.LIBRARY_RANGE input[type=number]')) e.stopPropagation();
  }, true);
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      const tab = tabOf(e.target);
      const go = tab && document.getElementById(tab + '-generate');
      if (go) { e.preventDefault(); e.stopPropagation(); go.click(); }
    } else if (e.key === 'Escape') {
      for (const stop of document.querySelectorAll('button[id$="-stop"]')) {
        if (!visible(stop)) continue;
        const status = document.querySelector('#' + stop.id.replace(/-stop$/, '-status') + ' textarea');
        if (status && /^(Running|Step )/.test(status.value)) stop.click();
      }
    }
  }, true);
})();
</script>
""".replace("LIBRARY_RANGE", LIBRARY_RANGE)
