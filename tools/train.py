#!/usr/bin/env python
"""Train a recipe: `[accelerate launch ...] tools/train.py RECIPE.yaml [key=value ...]`."""
import sys

from dist_ssl.engine.run import main

if __name__ == "__main__":
    sys.exit(main())
