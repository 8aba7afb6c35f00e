"""Write or verify WebDataset shards: ``python tools/make_shards.py {write,verify} ...``."""
import sys
from dist_ssl.data.make_shards_cli import main
if __name__ == "__main__":
    sys.exit(main())
