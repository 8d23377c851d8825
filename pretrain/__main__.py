"""``python -m pretrain``: the same as the ``pretrain`` console script (pretrain/cli.py)."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
