"""Tooling around the ``ldm`` library, kept out of the installed package: run from the repo root.

    python -m ldm_tools.train demo --out weights/demo   # train the bundled demo model
    python -m ldm_tools.eval demo                       # evaluate it (writes docs/demo-model.md)
    python -m ldm_tools.bench --quick                   # side-by-side benchmark with diffusers

These modules use only the library's public API (``import ldm``).
"""
