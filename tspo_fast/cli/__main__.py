"""``python -m tspo_fast.cli ...`` is ``tspo-fast ...``."""
import sys

from . import main

sys.exit(main())
