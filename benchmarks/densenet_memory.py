"""The DenseNet memory jobs from a source checkout; the same code as ``fastres memory`` (``fastres/cli/memory.py``).

    python -m benchmarks.densenet_memory compare [--json PATH]
    python -m benchmarks.densenet_memory depth [--depths 40 64 100] [--json PATH] [--plot PNG]
    python -m benchmarks.densenet_memory budget --budget-mb MB [--json PATH]
    python -m benchmarks.densenet_memory batch --budget-mb MB [--model densenet121] [--json PATH]
    python -m benchmarks.densenet_memory report PATH [--plot PNG]
"""

import sys

from fastres.cli import main

if __name__ == "__main__":
    sys.exit(main(["memory", *sys.argv[1:]]))
