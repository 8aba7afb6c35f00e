"""t-SNE PNG of a frozen backbone's features (IDMM paper Figure 2): ``python tools/tsne.py --backbone RUN_DIR ...``.

See :mod:`dist_ssl.eval.tsne` for the options.
"""
import sys

from dist_ssl.eval.tsne import main

if __name__ == "__main__":
    sys.exit(main())
