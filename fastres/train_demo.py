"""Kept for old scripts: ``python -m fastres.train_demo`` is ``fastres train --compare eager --check-agreement``.

    python -m fastres.train_demo [--arch resnet50] [--steps 60] [...]   # fastres train's options; --arch is --model
"""

import sys

from fastres.cli import main

if __name__ == "__main__":
    argv = ["--model" if a == "--arch" else a.replace("--arch=", "--model=") for a in sys.argv[1:]]
    sys.exit(main(["train", "--compare", "eager", "--check-agreement", *argv]))
