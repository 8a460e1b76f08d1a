"""`python -m labeling --db URL [--host 127.0.0.1 --port 7860]`: the same as `align label`."""

import sys

from align.commands import run_guarded
from align.commands.label import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
