"""`python -m labeling --db URL [--host 127.0.0.1 --port 7860]`: the same as `align label`."""

import sys

from align.cli import run_guarded
from align.label_cli import cmd_label

if __name__ == "__main__":
    sys.exit(run_guarded(cmd_label, sys.argv[1:]))
