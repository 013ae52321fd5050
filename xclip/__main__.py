"""``python -m xclip``: the command-line tools of the X-CLIP model (:mod:`xclip.cli`).

    python -m xclip classify VIDEO... --checkpoint PATH --labels "a,b,c"
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
