"""k-NN / linear-probe accuracy of a frozen backbone: ``python tools/eval.py --backbone RUN_DIR ...``.

Installed: ``dist-ssl-eval``. See :mod:`dist_ssl.eval.cli_eval` for the options; under torchrun extraction is split over ranks.
"""
import sys

from dist_ssl.eval.cli_eval import main

if __name__ == "__main__":
    sys.exit(main())
