#!/usr/bin/env python3
"""Regenerate the bundled English evaluation corpora from installed Debian doc packages.

Outputs (relative to the repository root):

* ``edgesmith/data/heldout.txt``: held-out text for perplexity / KL-divergence measurement.
* ``edgesmith/data/calibration.txt``: calibration text for importance-matrix computation,
  drawn from different documents than the held-out text, with no shared paragraph and no
  shared 20-word sequence.

Sources are the HTML manuals shipped by two Debian packages:

* ``sqlite3-doc``    (public domain):        /usr/share/doc/sqlite3/
* ``python3.11-doc`` (PSF License Agreement): /usr/share/doc/python3.11/html/

If a package is missing, install it first::

    sudo apt-get update && sudo apt-get install sqlite3-doc python3.11-doc

Only prose paragraphs (``<p>`` elements) are kept; code listings, tables, navigation,
headings, footers, paragraphs with URLs and code-heavy paragraphs are dropped. The output
is fully determined by the installed package files, so running the script twice gives
byte-identical files. Standard library only.

Usage::

    python3 scripts/make_corpora.py            # write both corpora
    python3 scripts/make_corpora.py --check    # verify the files on disk are up to date
    python3 scripts/make_corpora.py --survey   # per-file prose yield of candidate pages
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "edgesmith" / "data"
HELDOUT_PATH = DATA_DIR / "heldout.txt"
CALIBRATION_PATH = DATA_DIR / "calibration.txt"

SQLITE_PKG = "sqlite3-doc"
PYTHON_PKG = "python3.11-doc"
PACKAGE_ROOTS: dict[str, Path] = {
    SQLITE_PKG: Path("/usr/share/doc/sqlite3"),
    PYTHON_PKG: Path("/usr/share/doc/python3.11/html"),
}

# The versions the committed corpora were generated from (see edgesmith/data/PROVENANCE.md).
# Other versions still work, but may give different text; the script warns about them.
EXPECTED_VERSIONS: dict[str, str] = {
    SQLITE_PKG: "3.40.1-2+deb12u2",
    PYTHON_PKG: "3.11.2-6+deb12u9",
}

# Documents are used whole and in this order. The two lists must not share a document.
HELDOUT_SOURCES: tuple[tuple[str, str], ...] = (
    (SQLITE_PKG, "whentouse.html"),
    (SQLITE_PKG, "howtocorrupt.html"),
    (SQLITE_PKG, "appfileformat.html"),
    (SQLITE_PKG, "isolation.html"),
    (SQLITE_PKG, "flextypegood.html"),
)
CALIBRATION_SOURCES: tuple[tuple[str, str], ...] = (
    (SQLITE_PKG, "atomiccommit.html"),
    (SQLITE_PKG, "testing.html"),
    (SQLITE_PKG, "wal.html"),
    (SQLITE_PKG, "queryplanner.html"),
    (PYTHON_PKG, "howto/unicode.html"),
    (PYTHON_PKG, "howto/logging.html"),
    (PYTHON_PKG, "howto/functional.html"),
    (PYTHON_PKG, "tutorial/classes.html"),
    (PYTHON_PKG, "faq/design.html"),
)

HELDOUT_SIZE_RANGE = (60_000, 90_000)
CALIBRATION_SIZE_RANGE = (150_000, 250_000)
SHINGLE_WORDS = 20

# Paragraph filters.
MIN_WORDS = 20
MAX_CODE_FRACTION = 0.15
MAX_SYMBOL_FRACTION = 0.01
SYMBOL_CHARS = frozenset("{}[]<>=;|\\_*#$%^~`@")
BOILERPLATE_MARKERS = (
    "://",
    "www.",
    "last modified on",
    "copyright",
    "all rights reserved",
)


def _names(words: str) -> frozenset[str]:
    """A frozenset of the space-separated names in ``words``."""
    return frozenset(words.split())


SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")

# Block-level tags: any start or end tag of these closes an open paragraph.
BLOCK_TAGS = _names(
    "address article aside blockquote body caption dd div dl dt fieldset figcaption "
    "figure footer form h1 h2 h3 h4 h5 h6 header hr html li main nav ol p pre "
    "section table tbody td tfoot th thead tr ul"
)
# Elements whose whole content is ignored.
SKIP_TAGS = _names("script style pre table svg math form select button textarea object noscript")
# Container elements (balanced in both manuals) that are tracked on a stack.
CONTAINER_TAGS = _names("div section nav header footer aside blockquote ul ol dl") | SKIP_TAGS
# Containers with these classes are skipped (navigation, sidebars, tables of contents,
# "see also" boxes, version notes, the SQLite page header).
SKIP_CLASSES = _names(
    "nosearch fancy_toc menu submenu searchmenu sphinxsidebar related footer seealso "
    "versionadded versionchanged deprecated deprecated-removed toctree-wrapper "
    "highlight contents topic sidebar"
)
CODE_TAGS = _names("code tt kbd samp")
# Inline elements whose text is dropped (footnote markers, header permalinks).
DROP_INLINE_CLASSES = _names("footnote-reference headerlink")


@dataclass(frozen=True)
class Paragraph:
    text: str
    code_fraction: float


class ProseExtractor(HTMLParser):
    """Collect the text of ``<p>`` elements that lie outside skipped containers."""

    def __init__(self, *, require_main: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.require_main = require_main
        self.paragraphs: list[Paragraph] = []
        # Stack of (tag, skip, main) for open container elements.
        self._stack: list[tuple[str, bool, bool]] = []
        self._in_p = False
        self._buf: list[str] = []
        self._code_chars = 0
        self._code_depth = 0
        self._drop_depth = 0
        self._drop_tags: list[str] = []

    def _skipping(self) -> bool:
        if any(skip for _, skip, _ in self._stack):
            return True
        return self.require_main and not any(main for _, _, main in self._stack)

    def _close_paragraph(self) -> None:
        if self._in_p:
            raw = "".join(self._buf)
            total = len(raw.strip()) or 1
            self.paragraphs.append(Paragraph(raw, min(1.0, self._code_chars / total)))
        self._in_p = False
        self._buf = []
        self._code_chars = 0
        self._code_depth = 0
        self._drop_depth = 0
        self._drop_tags = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if tag in BLOCK_TAGS:
            self._close_paragraph()
        if tag in CONTAINER_TAGS:
            skip = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES)
            main = attr.get("role") == "main"
            self._stack.append((tag, skip, main))
        if tag == "p" and not self._skipping():
            self._in_p = True
            return
        if not self._in_p:
            return
        if self._drop_depth or classes & DROP_INLINE_CLASSES:
            self._drop_depth += 1
            self._drop_tags.append(tag)
        elif tag in CODE_TAGS:
            self._code_depth += 1
        elif tag == "br":
            self._buf.append(" ")
        elif tag == "sup":
            self._buf.append("^")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in BLOCK_TAGS:
            self._close_paragraph()
        elif self._in_p and tag == "br":
            self._buf.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in BLOCK_TAGS:
            self._close_paragraph()
        if tag in CONTAINER_TAGS:
            for i in range(len(self._stack) - 1, -1, -1):
                if self._stack[i][0] == tag:
                    del self._stack[i:]
                    break
            return
        if not self._in_p:
            return
        if self._drop_depth:
            if tag in self._drop_tags:
                idx = len(self._drop_tags) - 1 - self._drop_tags[::-1].index(tag)
                del self._drop_tags[idx:]
                self._drop_depth = len(self._drop_tags)
        elif tag in CODE_TAGS and self._code_depth:
            self._code_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._in_p or self._drop_depth:
            return
        self._buf.append(data)
        if self._code_depth:
            self._code_chars += len(data.strip())

    def close(self) -> None:
        super().close()
        self._close_paragraph()


def normalize(text: str) -> str:
    """NFC-normalize, map odd spaces to plain spaces and collapse all whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u00ad", "").replace("\u200b", "").replace("¶", "")
    text = "".join(
        " " if unicodedata.category(ch) in ("Zs", "Zl", "Zp", "Cc") else ch for ch in text
    )
    text = " ".join(text.split())
    # Remove the space that inline markup sometimes leaves before punctuation.
    return re.sub(r" ([.,;:!?)\]])(?=\s|$)", r"\1", text)


def keep(text: str, code_fraction: float) -> bool:
    """Return True if a normalized paragraph reads as clean English prose."""
    words = text.split()
    if len(words) < MIN_WORDS or code_fraction > MAX_CODE_FRACTION:
        return False
    if not SENTENCE_END.search(text):
        return False
    first = text[0]
    if not (first.isupper() or first.isdigit() or first in "\"'“‘("):
        return False
    lowered = text.lower()
    if any(marker in lowered for marker in BOILERPLATE_MARKERS):
        return False
    if "&" in text and re.search(r"&#?\w+;", text):
        return False
    symbols = sum(ch in SYMBOL_CHARS for ch in text)
    if symbols / len(text) > MAX_SYMBOL_FRACTION:
        return False
    letters = sum(ch.isalpha() for ch in text)
    return letters / len(text.replace(" ", "")) >= 0.8


def extract(package: str, relpath: str) -> list[str]:
    """Return the kept, normalized prose paragraphs of one HTML document."""
    path = PACKAGE_ROOTS[package] / relpath
    html = path.read_text(encoding="utf-8")
    parser = ProseExtractor(require_main=package == PYTHON_PKG)
    parser.feed(html)
    parser.close()
    out: list[str] = []
    for para in parser.paragraphs:
        text = normalize(para.text)
        if text and keep(text, para.code_fraction):
            out.append(text)
    return out


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def build(
    sources: tuple[tuple[str, str], ...], exclude: set[tuple[str, ...]] | None = None
) -> list[str]:
    """Concatenate the documents' paragraphs, dropping exact and 20-word near duplicates."""
    seen: set[tuple[str, ...]] = set(exclude or ())
    seen_text: set[str] = set()
    out: list[str] = []
    for package, relpath in sources:
        for text in extract(package, relpath):
            grams = shingles(text)
            if text in seen_text or grams & seen:
                continue
            seen_text.add(text)
            seen |= grams
            out.append(text)
    return out


def render(paragraphs: list[str]) -> bytes:
    return ("\n\n".join(paragraphs) + "\n").encode("utf-8")


def package_version(package: str) -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def require_packages(packages: set[str]) -> None:
    missing = sorted(pkg for pkg in packages if not PACKAGE_ROOTS[pkg].is_dir())
    if missing:
        sys.exit(
            f"error: Debian package(s) not installed: {' '.join(missing)}\n"
            f"install with: sudo apt-get update && sudo apt-get install {' '.join(missing)}"
        )


def verify(heldout: list[str], calibration: list[str]) -> None:
    """Fail if the corpora share a document, a paragraph or a 20-word sequence."""
    shared_docs = set(HELDOUT_SOURCES) & set(CALIBRATION_SOURCES)
    if shared_docs:
        sys.exit(f"error: documents used in both corpora: {sorted(shared_docs)}")
    if set(heldout) & set(calibration):
        sys.exit("error: a paragraph appears in both corpora")
    # Check on the whole texts, so sequences that span paragraph boundaries count too.
    if shingles(" ".join(heldout)) & shingles(" ".join(calibration)):
        sys.exit(f"error: the corpora share a {SHINGLE_WORDS}-word sequence")
    for name, paragraphs, (low, high) in (
        ("heldout", heldout, HELDOUT_SIZE_RANGE),
        ("calibration", calibration, CALIBRATION_SIZE_RANGE),
    ):
        size = len(render(paragraphs))
        if not low <= size <= high:
            sys.exit(f"error: {name} corpus is {size} bytes, expected {low}..{high}")


def survey() -> None:
    """Print the prose yield (bytes) of every HTML page of both packages."""
    require_packages(set(PACKAGE_ROOTS))
    rows: list[tuple[int, int, str, str]] = []
    for package, root in PACKAGE_ROOTS.items():
        for path in sorted(root.rglob("*.html")):
            rel = path.relative_to(root).as_posix()
            paras = extract(package, rel)
            rows.append((sum(len(p) + 2 for p in paras), len(paras), package, rel))
    for size, count, package, rel in sorted(rows, reverse=True):
        if size:
            print(f"{size:8d} {count:4d} {package} {rel}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="verify files are up to date")
    group.add_argument("--survey", action="store_true", help="print per-page prose yield")
    args = parser.parse_args(argv)
    if args.survey:
        survey()
        return 0

    require_packages({pkg for pkg, _ in HELDOUT_SOURCES + CALIBRATION_SOURCES})
    heldout = build(HELDOUT_SOURCES)
    held_grams: set[tuple[str, ...]] = set()
    for text in heldout:
        held_grams |= shingles(text)
    calibration = build(CALIBRATION_SOURCES, exclude=held_grams)
    verify(heldout, calibration)

    stale = False
    for path, paragraphs in ((HELDOUT_PATH, heldout), (CALIBRATION_PATH, calibration)):
        data = render(paragraphs)
        digest = hashlib.sha256(data).hexdigest()
        rel = path.relative_to(REPO_ROOT)
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                print(f"STALE {rel}")
                stale = True
            else:
                print(f"ok    {rel} {len(data)} bytes sha256 {digest}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {rel}: {len(data)} bytes, {len(paragraphs)} paragraphs, sha256 {digest}")
    for pkg in sorted({pkg for pkg, _ in HELDOUT_SOURCES + CALIBRATION_SOURCES}):
        version = package_version(pkg)
        print(f"source {pkg} {version}")
        if version != EXPECTED_VERSIONS[pkg]:
            print(
                f"warning: {pkg} {version} differs from {EXPECTED_VERSIONS[pkg]} used for the "
                "committed corpora; update PROVENANCE.md if the output changed",
                file=sys.stderr,
            )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
