"""Export a checkpoint's full sharded classifier: `python tools/export_fc.py CKPT OUT.safetensors [--key K]`
(installed: `dist-ssl-export-fc`; see dist_ssl/engine/cli_export_fc.py)."""
import sys

from dist_ssl.engine.cli_export_fc import main

if __name__ == "__main__":
    sys.exit(main())
