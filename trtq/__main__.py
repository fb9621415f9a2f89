"""``python -m trtq`` is the ``trtq`` command."""

import sys

from trtq.cli import main

sys.exit(main())
