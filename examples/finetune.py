"""Fine-tune X-CLIP on a folder of labelled videos with the official recipe.

    python examples/finetune.py --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 examples/finetune.py --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 examples/finetune.py --model xclip-l14 --fsdp --grad-checkpointing ...
    python examples/finetune.py --model xclip-b32 --synthetic 64 --max-steps 20 --workers 0   # smoke test

Data: ``videos/<class_name>/<video files>`` (label text = folder name, ``_`` as spaces). The run
is :func:`xclip.train.main` (the same as ``python -m xclip.train``): see ``xclip/train`` for the
recipe and ``--help`` for the flags. Rank 0 writes ``labels.txt`` and ``*.safetensors``
checkpoints (:func:`xclip.load_checkpoint` reads them) to ``--output``.
"""

import sys

import xclip.train

if __name__ == "__main__":
    xclip.train.main(sys.argv[1:])
