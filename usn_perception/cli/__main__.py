"""``python -m usn_perception.cli``."""

import sys

from usn_perception.cli import main

sys.exit(main())
