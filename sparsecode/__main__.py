import os
import sys

from .cli import main
from .distributed import FAILED_GROUP

code = main()
if FAILED_GROUP[0]:  # a rank that failed with its group: gloo's threads can abort the interpreter's exit after the
    sys.stdout.flush()  # one error line ("terminate called without an active exception"), so leave at once
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
