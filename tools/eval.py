"""k-NN / linear-probe accuracy of a frozen backbone: ``python tools/eval.py --backbone RUN_DIR ...``.

See :mod:`dist_ssl.eval.cli` for the options; under torchrun extraction is split over ranks.
"""
import sys

from dist_ssl.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
