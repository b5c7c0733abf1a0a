"""``python -m pipeline label ...`` (same as the ``diffseg`` command)."""
import sys

from pipeline.cli import main

sys.exit(main())
