"""`python -m sparsecode` and the `sparsecode` console script: the command line, then the process's exit."""

import os
import sys

from .cli import main
from .distributed import failed_in_group


def run() -> None:
    """Exit with `main`'s code; a rank that failed with its torchrun group leaves at once, after flushing (gloo's
    threads can abort a normal exit after the one error line: "terminate called without an active exception")."""
    code = main()
    if failed_in_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
