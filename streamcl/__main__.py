"""``python -m streamcl`` is the ``streamcl`` command."""

import sys

from streamcl.cli import main

if __name__ == "__main__":
    sys.exit(main())
