"""MkDocs hooks: the site's home page is the repository's README.md (one source), with its
``docs/`` links made relative to the documentation folder; Sphinx-style roles in docstrings
(``:class:`X```) are shown as the code they name."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj):(<code)")


def on_page_read_source(page, config):
    if page.file.src_uri == "index.md":
        return README.read_text().replace("](docs/", "](")
    return None


def on_page_content(html, page, config, files):
    return ROLE.sub(r"\1", html)
