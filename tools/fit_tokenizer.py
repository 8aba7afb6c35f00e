#!/usr/bin/env python
"""Fit a BEiT tokenizer codebook on training shards: `tools/fit_tokenizer.py --shards DIR --out FILE ...`
(installed: `dist-ssl-fit-tokenizer`; see dist_ssl/models/cli_fit_tokenizer.py)."""
import sys

from dist_ssl.models.cli_fit_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
