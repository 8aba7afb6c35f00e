"""t-SNE PNG of a frozen backbone's features (IDMM paper Figure 2): ``python tools/tsne.py --backbone RUN_DIR ...``.

Installed: ``dist-ssl-tsne``. See :mod:`dist_ssl.eval.cli_tsne` for the options.
"""
import sys

from dist_ssl.eval.cli_tsne import main

if __name__ == "__main__":
    sys.exit(main())
