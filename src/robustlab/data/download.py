"""Fetch dataset files over HTTP and refuse any byte that does not match a published sha256.

Digests are those of the files as their publishers serve them (cross-checked against
tensorflow-datasets' url_checksums and other independent listings). A download goes to a
temporary file beside its destination and is renamed into place only after the digest
matches, so an interrupted or corrupted transfer never leaves a file the loaders would trust.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import shareable
from ..errors import RobustlabError

MIRROR_ENV = "ROBUSTLAB_DATA_MIRROR"

BASE_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist",
    "cifar10": "https://www.cs.toronto.edu/~kriz",
    "cifar100": "https://www.cs.toronto.edu/~kriz",
}

# dataset -> {file name -> sha256 of the file as published}
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
    "cifar100": {
        "cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    },
}

_CHUNK = 1 << 20


def file_url(name: str, filename: str) -> str:
    """URL of one file of a dataset; $ROBUSTLAB_DATA_MIRROR replaces the publisher's base URL."""
    base = os.environ.get(MIRROR_ENV) or BASE_URLS[name]
    if not base.startswith(("http://", "https://", "file://")):
        raise RobustlabError(f"{MIRROR_ENV} must be a URL starting with http://, https:// or file://, got {base!r}")
    return f"{base.rstrip('/')}/{filename}"


def download_file(url: str, dest: Path, sha256: str) -> Path:
    """Stream `url` to `dest`, verifying its sha256; `dest` appears only once verified."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:  # e.g. a file where a folder of the path should be
        raise RobustlabError(f"cannot download into {dest.parent}: {exc.strerror or exc}") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # the last: a connection cut short
        os.unlink(tmp)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # an HTTP error carries the open response
        reason = getattr(exc, "reason", exc)
        raise RobustlabError(
            f"download of {url} failed ({reason}); check the network, set {MIRROR_ENV} to a mirror, "
            f"or put {dest.name} into {dest.parent} by hand"
        ) from None
    except BaseException:
        os.unlink(tmp)
        raise
    got = digest.hexdigest()
    if got != sha256:
        os.unlink(tmp)
        raise RobustlabError(f"checksum mismatch for {url}: expected {sha256}, got {got}; "
                             f"the file was discarded, try again or use another mirror ({MIRROR_ENV})")
    shareable(tmp)  # mkstemp made it owner-only: a shared data folder would be unreadable for everyone else
    os.replace(tmp, dest)
    return dest


def download_dataset(name: str, dest_dir: Path) -> None:
    """Download every published file of dataset `name` into `dest_dir`, skipping those present."""
    for filename, sha256 in SHA256[name].items():
        target = Path(dest_dir) / filename
        if not target.exists():
            download_file(file_url(name, filename), target, sha256)
