"""Download one sdist from a PEP 503 index and check its sha256, without building metadata.

``pip download`` builds the package metadata, which fails for pb1-detectron2 (its "all" extra
declares a direct URL dependency that PyPI packages may not have). Usage:
``python scripts/fetch_sdist.py pb1-detectron2 0.6 DEST_DIR`` → prints the downloaded path.
"""

import hashlib
import os
import re
import sys
import urllib.request
from urllib.parse import urljoin


def main(name: str, version: str, dest: str) -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/"
    page_url = urljoin(index, name + "/")
    with urllib.request.urlopen(page_url, timeout=60) as r:
        page = r.read().decode()
    pattern = re.compile(
        r'href="([^"]*?%s-%s\.tar\.gz)(?:#sha256=([0-9a-f]+))?"'
        % (re.escape(name), re.escape(version))
    )
    match = pattern.search(page)
    if match is None:
        sys.exit(f"error: {name}=={version} sdist not found at {page_url}")
    url, sha = urljoin(page_url, match.group(1)), match.group(2)
    path = os.path.join(dest, url.rsplit("/", 1)[-1])
    with urllib.request.urlopen(url, timeout=300) as r:
        data = r.read()
    if sha and hashlib.sha256(data).hexdigest() != sha:
        sys.exit(f"error: sha256 mismatch for {url}")
    with open(path, "wb") as f:
        f.write(data)
    print(path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
