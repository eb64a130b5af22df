"""Every citation of the project's own docs resolves: `docs/X.md §N` names a section X has, `(Mk)` an equation
docs/method.md defines, and a `see path` names a file that ships with the project."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("ulcore", "flows", "benchmarks", "tests", "infra", "docs")
           for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".json")]
SOURCES += [ROOT / name for name in ("README.md", "params.yaml", "dvc.yaml", "Makefile", "pyproject.toml")]
SOURCES.remove(Path(__file__).resolve())  # its own examples of what does not resolve
CITATION = re.compile(r"docs/(\w+)\.md((?:\s*(?:§\d+(?:\s*[-–]\s*§?\d+)?|\(M\d+\)(?:\s*[-–]\s*\(M\d+\))?)"
                      r"(?:\s*(?:,|and)\s*)?)*)")
SEE_PATH = re.compile(r"\bsee (?:`)?((?:ulcore|flows|tests|benchmarks|infra|docs)/[\w/.-]+\.\w+)")
FORBIDDEN = re.compile(r"ul_method\.md|research/|STYLE habit|\bDESIGN\.md|shared/(?:DESIGN|STYLE|research)")


def _sections(doc: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^#+\s+(\d+)\.", doc.read_text(), flags=re.M)}


def _equations(doc: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^\s+\(M(\d+)\)", doc.read_text(), flags=re.M)}


def citations(text: str) -> list[tuple[str, str, int]]:
    """(doc, kind, number) for every `docs/X.md §N`, `§N-§M` (both ends), `(Mk)` and `(Mk)-(Mj)` in `text`."""
    found = []
    for match in CITATION.finditer(text):
        doc, tail = match.group(1), match.group(2)
        found += [(doc, "§", int(n)) for n in re.findall(r"§?\s*(\d+)", " ".join(re.findall(r"§[\d\s\-–§]+", tail)))]
        found += [(doc, "M", int(n)) for n in re.findall(r"\(M(\d+)\)", tail)]
    return found


def test_citation_parser_reads_sections_ranges_and_equations():
    text = "see docs/method.md §4-§8 and docs/design.md §2, also docs/method.md (M7)-(M8); docs/method.md"
    assert sorted(citations(text)) == [("design", "§", 2), ("method", "M", 7), ("method", "M", 8),
                                       ("method", "§", 4), ("method", "§", 8)]


def problems(text: str) -> list[str]:
    """What in `text` does not resolve inside the repository."""
    found = []
    for doc, kind, number in citations(text):
        target = ROOT / "docs" / f"{doc}.md"
        label = f"§{number}" if kind == "§" else f"(M{number})"
        if not target.exists():
            found.append(f"docs/{doc}.md does not exist")
        elif number not in (_sections(target) if kind == "§" else _equations(target)):
            found.append(f"docs/{doc}.md has no {label}")
    found += [f"see {p}: no such file" for p in SEE_PATH.findall(text) if not (ROOT / p).exists()]
    found += [f"cites material that does not ship with the project: {m!r}" for m in FORBIDDEN.findall(text)]
    return found


def test_unresolved_citations_are_reported():
    text = "docs/method.md §99, docs/method.md (M0), docs/nothing.md §1, see ulcore/nothing.py, STYLE habit 3"
    assert problems(text) == ["docs/method.md has no §99", "docs/method.md has no (M0)",
                              "docs/nothing.md does not exist", "see ulcore/nothing.py: no such file",
                              "cites material that does not ship with the project: 'STYLE habit'"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_citations_resolve_inside_the_repository(path: Path):
    found = problems(path.read_text(errors="replace"))
    assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)
