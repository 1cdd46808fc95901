"""The documentation: the site in docs/ builds without a warning (every link between pages and every
#anchor resolves), and every link of the README, the front page, leads to a file and a heading or
anchor that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]

# [text](target) outside code: targets without a scheme are files of this repository.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _links(markdown: str) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def _anchors(path: Path) -> set[str]:
    """The anchors a page offers: its headings' ids (as MkDocs makes them) and explicit <a id>."""
    text = FENCE.sub("", path.read_text())
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
    return {slugify(h, "-") for h in headings} | set(re.findall(r'<a id="([^"]+)"', text))


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """`mkdocs build --strict` fails on any warning: a link to a missing page, a missing anchor, a
    page left out of the nav."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "operations" / "index.html").exists()


def test_every_page_of_docs_is_in_the_nav() -> None:
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    docs = ROOT / "docs"
    assert listed == {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}


def _readme_links() -> list[str]:
    return _links((ROOT / "README.md").read_text())


def test_the_readme_links_to_the_docs() -> None:
    targets = {link.split("#")[0] for link in _readme_links()}
    assert {"docs/index.md", "docs/pipeline-reference.md", "docs/operations.md", "docs/cli.md"} <= targets


@pytest.mark.parametrize("link", _readme_links())
def test_readme_link_resolves(link: str) -> None:
    file, _, anchor = link.partition("#")
    path = (ROOT / file) if file else ROOT / "README.md"
    assert path.is_file(), f"README links to {file}, which does not exist"
    if anchor:
        assert anchor in _anchors(path), f"README links to {link}: {file or 'README.md'} has no #{anchor}"


def test_the_link_checker_sees_a_broken_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('# Title\n\n## Faults and retries\n\n<a id="tls"></a>**TLS.**\n\n```\n## not a heading\n```\n')
    assert _anchors(page) == {"title", "faults-and-retries", "tls"}
    assert _links("[a](x.md#y) `[b](c.md)` [c](https://example.com)\n```\n[d](e.md)\n```\n") == ["x.md#y"]
