"""The documentation in docs/: every public name is documented, every name the docs give exists, every
link between the pages resolves, and no file points at notes outside the repository."""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

import fastar

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Folders that hold no sources of the project (build outputs, environments, caches).
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
# The name of background notes kept outside the repository; written so that this file does not contain it.
EXTERNAL_NOTES = "semantics".upper()


def doc_pages():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, f"no documentation pages in {DOCS}"
    return pages


def docs_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in doc_pages())


def public_names():
    """Qualified public names: fastar.__all__ and the __all__ of its public submodules."""
    names = [f"fastar.{name}" for name in fastar.__all__]
    for module in (fastar.generate, fastar.masks, fastar.reference):
        names += [f"{module.__name__}.{name}" for name in module.__all__]
    return names


def test_every_public_name_is_documented():
    text = docs_text()
    missing = [name for name in public_names() if not re.search(re.escape(name) + r"(?!\w)", text)]
    assert not missing, f"public names no page of docs/ mentions: {missing}"


def resolve(dotted: str):
    """The object a dotted name ``fastar.x.y`` names (attributes, or submodules imported on the way)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[: i + 1]))
        obj = getattr(obj, part)
    return obj


def test_names_in_the_docs_exist():
    """A renamed or removed op must not stay documented under its old name."""
    pytest.importorskip("transformers")  # fastar.integrations.huggingface is documented
    named = set(re.findall(r"(?<![\w.])fastar(?:\.\w+)+", docs_text()))
    assert len(named) > 20  # the pattern finds the qualified names the pages give
    unknown = []
    for dotted in sorted(named):
        try:
            resolve(dotted)
        except (AttributeError, ImportError):
            unknown.append(dotted)
    assert not unknown, f"docs/ names what fastar does not have: {unknown}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    anchors = {
        page.name: {slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)}
        for page in doc_pages()
    }
    broken = []
    for page in doc_pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and (file.name not in anchors or anchor not in anchors[file.name]):
                broken.append(f"{page.name}: {target}")
    assert not broken, f"links to missing pages or headings: {broken}"


def test_no_file_points_at_notes_outside_the_repository():
    """What users need is in docs/; the background notes the project was written from are not shipped."""
    needle = EXTERNAL_NOTES.encode()
    hits = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in (".so", ".pyc", ".png") or path.is_symlink():
                continue
            if needle in path.read_bytes():
                hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"files that cite {EXTERNAL_NOTES}; point into docs/ instead: {hits}"
