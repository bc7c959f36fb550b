"""`python -m ldm.bench` points to the benchmark's home: the library must not depend on the tools
(ldm_tools/ is not installed with ldm), so the benchmark lives in `ldm_tools.bench`."""
from __future__ import annotations

import sys

MOVED = ("The benchmark is `python -m ldm_tools.bench` (run from the repository root), e.g.\n"
         "  python -m ldm_tools.bench --quick --shape half --sampler DDIM\n"
         "  python -m ldm_tools.bench --device cuda --suite gpu\n"
         "See docs/performance.md.")

if __name__ == "__main__":
    print(MOVED, file=sys.stderr)
    sys.exit(2)
