"""``python -m fastrec ARGS``: the ``fastrec`` command, where the console script is not on PATH."""

import sys

from fastrec.cli import main

sys.exit(main())
