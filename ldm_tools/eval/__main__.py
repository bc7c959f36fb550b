"""Command line: ``python -m ldm_tools.eval demo [--model weights/demo] [--seeds N]``."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm_tools.eval")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="evaluate the bundled demo model and write docs/demo-model.md")
    d.add_argument("--model", default="weights/demo")
    d.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    d.add_argument("--doc", default="docs/demo-model.md", help="where to write the report ('' to skip)")
    d.add_argument("--inpaint-cases", type=int, default=48)
    a = p.parse_args(argv)
    if a.cmd == "demo":
        from .demo import run

        run(a.model, seeds=a.seeds, doc=a.doc or None, inpaint_n=a.inpaint_cases)


if __name__ == "__main__":
    main()
