"""Every relative link in the README and docs/ leads to a file that exists, and every #anchor to a heading.

Anchors are GitHub's: the heading in lower case, punctuation dropped, spaces as hyphens, a repeated
heading numbered -1, -2, ... Links to the web are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "artifacts" / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks (their brackets are code, not links)."""
    return FENCE.sub("", text)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(prose(markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(document: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(document.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_the_slugs_follow_github():
    assert anchors("# A\n## `ortft train` (device)\n## Weights (ortft/x_y.py)\n## A\n") == {
        "a", "ortft-train-device", "weights-ortftx_ypy", "a-1"}


def test_links_are_found_outside_code_only(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("[a](x.md) `[b](y.md)` [web](https://example.org)\n```\n[c](z.md)\n```\n[d](#top)\n")
    assert relative_links(document) == ["x.md", "#top"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / unquote(path_part)).resolve() if path_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)
