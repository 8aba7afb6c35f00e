#!/usr/bin/env python
"""Train a recipe: `[accelerate launch ...] tools/train.py RECIPE.yaml [key=value ...]`
(installed: `dist-ssl-train`; see dist_ssl/engine/cli_train.py)."""
import sys

from dist_ssl.engine.cli_train import main

if __name__ == "__main__":
    sys.exit(main())
