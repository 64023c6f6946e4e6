"""``python -m sskt_lightning.report DIR [DIR ...]``: see :mod:`sskt_lightning.report`."""
import sys

from sskt_lightning.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
