"""Write or verify WebDataset shards: ``python tools/make_shards.py {write,verify} ...``
(installed: ``dist-ssl-shards``; see :mod:`dist_ssl.data.cli_shards`)."""
import sys

from dist_ssl.data.cli_shards import main

if __name__ == "__main__":
    sys.exit(main())
