"""``python -m xclip.train ...`` (or ``torchrun ... -m xclip.train ...``): a fine-tuning run,
the same as ``examples/finetune.py``; ``--help`` lists the flags."""

import sys

from .finetune import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python -m xclip.train")
