"""Locate the real Fashion-MNIST IDX files, or fetch them from the official mirror.

On Debian the package `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist;
elsewhere `python -m dist_ssl.data.fashion_mnist DIR` downloads the four gzipped IDX files
(Xiao et al. 2017, https://github.com/zalandoresearch/fashion-mnist) and checks their MD5s.
"""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {  # name -> MD5 of the official files (Debian re-gzips them, so its MD5s differ)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def download(out_dir: Path) -> Path:
    """Download missing files into out_dir (atomic per file), verifying MD5s."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, md5 in FILES.items():
        target = out_dir / name
        if target.is_file() and _md5(target) == md5:
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(URL + name, timeout=60) as resp, open(tmp, "wb") as fh:
            fh.write(resp.read())
        if _md5(tmp) != md5:
            tmp.unlink()
            raise RuntimeError(f"{name}: MD5 mismatch after download from {URL}; try again")
        os.replace(tmp, target)
    return out_dir


if __name__ == "__main__":
    print(download(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir()))
