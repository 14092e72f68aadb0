"""``python -m nsexp``: the same as the ``nsexp`` command."""

import sys

from nsexp.cli import main

if __name__ == "__main__":
    sys.exit(main())
