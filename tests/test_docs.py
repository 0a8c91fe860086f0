"""The repository's documents stand alone: every reference in a tracked text
file points at something the repository has.

Rules, each reported as ``file:line: rule: text``:

- ``md``: a ``NAME.md`` reference resolves to a tracked file, by its path
  relative to the referring file, relative to the repository root, or (for a
  name alone, or a path tail) as the one tracked file whose path ends so.
- ``section``: a ``§N`` or ``§N.M`` reference names a numbered heading
  (``## 3. Sessions and regions``, ``### 3.2 Regions``) of the document it
  refers to: the ``NAME.md`` just before it (on its line, or ending the line
  before); else, inside a ``.md`` file, the file itself; else the last
  ``NAME.md`` named earlier in the file.
- ``design``: no reference to a design document outside the repository
  (the brief's name followed by a section sign, or its ``.md`` file name).
- ``work-item``: no work-item numbers (``issue 4``, ``issues 2 and 3``,
  ``phase 1``); say the decision or the measurement instead. Paths such as
  ``bench/logs/...-issue5-...`` and URLs such as ``.../issues/12`` are not
  citations and pass.

Raw logs under ``bench/logs/`` are records and are not scanned; neither are
binary files, nor this file (its self-test holds offending text on purpose).
Needs git, not the daemon.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
SELF = "tests/test_docs.py"
SKIPPED_DIRS = ("bench/logs/",)
# Names of files the benchmarks write into their output folder
# (bench/attention/run.py, bench/decode/run.py, scripts/gpu/bench.sh,
# scripts/gpu/bf16_logits.py, scripts/gpu/overlap.sh, tacflow ab): names, not references
# to documents of the repository.
GENERATED = {"attention.md", "decode.md", "bf16_logits.md", "ab.md", "overlap.md"}

URL = re.compile(r"[a-z]+://\S+")
MD_REF = re.compile(r"(?<![\w/.$*-])((?:\.\.?/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w])")
SECTION_REF = re.compile(r"§\s?(\d+(?:\.\d+)*)")
# What may sit between `NAME.md` and its `§`: quotes, brackets, a comma.
BETWEEN = re.compile(r"^[`'\")\]]*[\s,]*$")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
DESIGN_REF = re.compile(r"\bDESIGN(?:\.md\b|\s*§)")
WORK_ITEM = re.compile(r"\b(?:[Ii]ssues?|[Pp]hases?)[ -]#?\d+")


@dataclass(frozen=True)
class Offence:
    path: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.text}"


def sections(text: str) -> set[str]:
    """Numbers of the numbered headings of a Markdown text, outside code."""
    found, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            found.add(m.group(1))
    return found


class Checker:
    """The rules over a set of files, given as path -> text (``None`` for a
    file whose text is not needed: only ``.md`` texts are read, for their
    headings)."""

    def __init__(self, files: dict[str, str | None]):
        self.files = files
        self._sections: dict[str, set[str]] = {}

    def resolve(self, referrer: str, ref: str) -> str | None:
        base = PurePosixPath(referrer).parent
        for candidate in (base / ref, PurePosixPath(ref)):
            parts: list[str] = []
            for p in candidate.parts:
                if p == "..":
                    if not parts:
                        break
                    parts.pop()
                elif p != ".":
                    parts.append(p)
            else:
                path = "/".join(parts)
                if path in self.files:
                    return path
        tail = "/" + ref.lstrip("./")
        hits = [f for f in self.files if ("/" + f).endswith(tail)]
        return hits[0] if len(hits) == 1 else None

    def sections_of(self, path: str) -> set[str]:
        if path not in self._sections:
            self._sections[path] = sections(self.files[path] or "")
        return self._sections[path]

    def md_refs(self, path: str, line: str, urls: list[tuple[int, int]]):
        """`(start, end, target or None, name)` of each `NAME.md` on a line."""
        for m in MD_REF.finditer(line):
            name = PurePosixPath(m.group(1)).name
            if in_spans(m.start(), urls) or name in GENERATED or name == "DESIGN.md":
                continue  # DESIGN.md: the design rule reports it
            yield m.start(), m.end(), self.resolve(path, m.group(1)), m.group(1)

    def section_doc(self, path: str, line: str, at: int, refs, last_doc, wrapped) -> str | None:
        """The document a `§` at `at` refers to; `""` when a bad NAME.md
        before it was reported already. `wrapped` is the document that ended
        the previous line, if one did (`PROTOCOL.md` / `§4.4` across a line
        break)."""
        before = [r for r in refs if r[1] <= at]
        if before and BETWEEN.match(line[before[-1][1] : at]):
            return before[-1][2] or ""
        if not before and wrapped is not None and not line[:at].strip(" `'\"([>"):
            return wrapped
        if path.endswith(".md"):
            return path
        return before[-1][2] if before else last_doc

    def check(self, path: str, text: str) -> list[Offence]:
        out: list[Offence] = []
        last_doc: str | None = None
        wrapped: str | None = None
        for n, line in enumerate(text.splitlines(), 1):
            urls = [m.span() for m in URL.finditer(line)]
            rules: list[str] = []
            refs = list(self.md_refs(path, line, urls))
            rules += [f"md: {name} is not a file of the repository" for *_, t, name in refs if not t]
            for m in SECTION_REF.finditer(line):
                after_design = re.search(r"DESIGN(?:\.md)?\W*$", line[: m.start()])
                if in_spans(m.start(), urls) or after_design:
                    continue  # the design rule reports it
                doc = self.section_doc(path, line, m.start(), refs, last_doc, wrapped)
                if doc is None:
                    rules.append(f"section: §{m.group(1)} names no document")
                elif doc and m.group(1) not in self.sections_of(doc):
                    rules.append(f"section: {doc} has no §{m.group(1)}")
            last_doc = next((r[2] for r in reversed(refs) if r[2]), last_doc)
            ends = refs and BETWEEN.match(line[refs[-1][1] :])
            wrapped = (refs[-1][2] or "") if ends else None
            if DESIGN_REF.search(line):
                rules.append("design: cites a document outside the repository")
            if any(not in_spans(m.start(), urls) for m in WORK_ITEM.finditer(line)):
                rules.append("work-item: cites a work-item number")
            out += [Offence(path, n, r, line.strip()) for r in rules]
        return out


def in_spans(i: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= i < b for a, b in spans)


def tracked_files() -> dict[str, str | None]:
    """Every tracked text file: path -> text (``None`` for binary files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    files: dict[str, str | None] = {}
    for path in filter(None, listed.split("\0")):
        file = ROOT / path
        if not file.is_file():
            continue  # deleted in the working tree
        data = file.read_bytes()
        try:
            files[path] = None if b"\0" in data else data.decode("utf-8")
        except UnicodeDecodeError:
            files[path] = None
    return files


def test_every_reference_resolves_and_nothing_cites_outside_the_repository():
    files = tracked_files()
    assert "ipc/PROTOCOL.md" in files, "git ls-files found no repository"
    checker = Checker(files)
    offences = [
        o
        for path, text in sorted(files.items())
        if text is not None and path != SELF and not path.startswith(SKIPPED_DIRS)
        for o in checker.check(path, text)
    ]
    assert not offences, f"{len(offences)} bad references:\n" + "\n".join(map(str, offences))


# The checker on synthetic text: each rule must fire where it should (so the
# test above can fail) and stay quiet where it should.

DOCS = {
    "ipc/PROTOCOL.md": "# P\n\n## 1. Transport\n\n## 3. Sessions\n\n### 3.2 Regions\n\n```\n## 9. in code\n```\n",
    "kernels/TACTIC.md": "# T\n\n### 4. Cluster size\n",
    "README.md": "# r\n",
    "client-py/README.md": "# c\n",
    "client-py/tacflow/region.py": None,
}


def rules(path: str, text: str) -> list[str]:
    return [o.rule.split(":")[0] for o in Checker(DOCS).check(path, text)]


def test_sections_are_the_numbered_headings_outside_code():
    assert sections(DOCS["ipc/PROTOCOL.md"]) == {"1", "3", "3.2"}


def test_md_references_resolve_by_relative_path_root_or_unique_name():
    assert rules("client-py/README.md", "see [it](../ipc/PROTOCOL.md#regions)") == []
    assert rules("kernels/TACTIC.md", "numbers in ipc/PROTOCOL.md and README.md") == []
    assert rules("client-py/tacflow/region.py", "# PROTOCOL.md, TACTIC.md, `ipc/PROTOCOL.md`") == []
    assert rules("README.md", "written to $OUT/*.md and attention.md") == []
    assert rules("README.md", "https://example.org/x/NOTES.md") == []
    assert rules("README.md", "see NOTES.md") == ["md"]
    assert rules("README.md", "see kernels/PROTOCOL.md") == ["md"]


def test_section_references_name_existing_sections():
    assert rules("README.md", "PROTOCOL.md §3.2 and `PROTOCOL.md` §1, (PROTOCOL.md, §3)") == []
    assert rules("README.md", "PROTOCOL.md §3.3") == ["section"]
    assert rules("README.md", "PROTOCOL.md §9") == ["section"]  # only inside a code block
    assert rules("ipc/PROTOCOL.md", "as §3.2 says") == []
    assert rules("kernels/TACTIC.md", "see PROTOCOL.md\n§3.2 (wrapped)") == []
    assert rules("kernels/TACTIC.md", "see PROTOCOL.md\n§4 (wrapped)") == ["section"]
    assert rules("ipc/PROTOCOL.md", "as §5 says") == ["section"]
    assert rules("kernels/TACTIC.md", "decision §4; PROTOCOL.md §3.2") == []
    # A bare § outside Markdown refers to the document named last before it.
    assert rules("client-py/tacflow/region.py", '"""PROTOCOL.md\n\n§3.2 and §1"""') == []
    assert rules("client-py/tacflow/region.py", '"""PROTOCOL.md\n\n§4"""') == ["section"]
    assert rules("client-py/tacflow/region.py", "# as §2 says") == ["section"]


# The brief's name, kept out of this file's own text so that a search of
# the repository for its citations finds none here.
BRIEF = "DES" + "IGN"


def test_design_brief_citations_are_flagged():
    assert rules("README.md", f"counted as {BRIEF} \u00a75 defines them") == ["design"]
    assert rules("README.md", f"the job ({BRIEF}.md \u00a74)") == ["design"]
    assert rules("client-py/tacflow/region.py", f"# ({BRIEF} \u00a79)") == ["design"]
    assert rules("README.md", "the design of the cache") == []


def test_work_item_numbers_are_flagged():
    for text in ["(issue 4)", "issues 2 and 3", "phase 1 of issue 3", "Issue 5's bound", "the issue-6 changes"]:
        assert rules("README.md", text) == ["work-item"], text
    for text in [
        "the kernel was issue-bound",
        "logs/2026-11-27-issue5-h100-run62.log",
        "https://github.com/org/repo/issues/12",
        "a two-phase kernel",
        "a separate work item",
    ]:
        assert rules("README.md", text) == [], text
