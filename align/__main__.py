import sys

from align.commands import main

sys.exit(main())
