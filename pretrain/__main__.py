"""``python -m pretrain`` / ``deepspeed -m pretrain``: the pretraining entry point (see pretrain/train.py)."""

import sys

from pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
