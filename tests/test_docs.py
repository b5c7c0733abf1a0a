"""The README is a short guide and the docs hold together: links resolve, paths exist, commands parse.

``quick_start_commands()`` is the README's quick start as shell lines, for the tests that run it.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

_FENCE = re.compile(r"^```(\w*)\s*$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"`((?:diffseg_core|pipeline|jobs|benchmarks|examples|tests|docs|\.ci)/[\w./-]*)`")


def _section(text: str, title: str) -> str:
    """The lines under the level-2 heading ``title`` up to the next level-2 heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1:end])


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced block of a Markdown text as (its language, its lines)."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif line.startswith("```") and lang is not None:
            blocks.append((lang, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_lines(lines: list[str]) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, ``\\`` continuations joined."""
    out, pending = [], ""
    for line in lines:
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((pending + stripped).strip())
        pending = ""
    return out


def _runs_pytest(block: list[str]) -> bool:
    return any(line.split()[0] == "pytest" for line in block)


def quick_start_commands() -> list[str]:
    """The README's quick start, as the shell lines a user copies, in order.

    Taken from the ```bash blocks under "## Quick start"; each item is one line as written
    (``a && b`` stays one item: see ``split_commands``).
    """
    section = _section(README.read_text(), "Quick start")
    return [cmd for lang, body in code_blocks(section) if lang == "bash" for cmd in shell_lines(body)]


def split_commands(line: str) -> list[list[str]]:
    """One shell line as its simple commands' argv (split on ``&&``, ``;`` and ``|``; comments dropped)."""
    commands, current = [], []
    for token in shlex.split(line, comments=True):
        if token in ("&&", ";", "|", "||"):
            commands.append(current)
            current = []
        elif token.endswith(";") and len(token) > 1:
            current.append(token[:-1])
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _documented_diffseg_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every ``diffseg`` command in the docs' shell blocks and ``$ diffseg`` lines."""
    found = []
    for doc in DOCS:
        for lang, body in code_blocks(doc.read_text()):
            if lang == "bash":
                lines = shell_lines(body)
            else:
                lines = [line[2:] for line in body if line.startswith("$ diffseg ")]
            for line in lines:
                found += [(f"{doc.relative_to(REPO)}: {line}", argv) for argv in split_commands(line)
                          if argv[0] == "diffseg"]
    return found


def test_the_readme_is_a_guide_of_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"
    headings = [line for line in lines if line.startswith("## ") or line.startswith("### ")]
    for section in ("## Quick start", "### Label", "### Look", "### Export", "### Train", "### Tune", "### Cluster"):
        assert section in headings


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        for target in _LINK.findall(doc.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists() or REPO not in (resolved, *resolved.parents):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
                continue
            if anchor:
                headings = [_slug(line) for line in resolved.read_text().splitlines() if line.startswith("#")]
                if anchor not in headings:
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_every_doc_links_back_and_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text()
    for page in DOCS[1:]:
        assert f"(docs/{page.name})" in readme, page.name
        assert "(../README.md)" in page.read_text(), page.name


def test_no_doc_names_a_path_outside_the_repo_or_one_that_does_not_exist():
    problems = []
    for doc in DOCS:
        text = doc.read_text()
        for outside in ("../shared", "/work/", "DESIGN.md"):
            if outside in text:
                problems.append(f"{doc.relative_to(REPO)} mentions {outside}")
        for path in _REPO_PATH.findall(text):
            if not (REPO / path).exists():
                problems.append(f"{doc.relative_to(REPO)} names {path}, which is not in the repo")
    assert not problems, problems


def test_the_quick_start_has_the_main_job_the_demo_model_and_the_tests():
    commands = quick_start_commands()
    assert commands
    argvs = [argv for line in commands for argv in split_commands(line)]
    labels = [argv for argv in argvs if argv[:3] == ["diffseg", "label", "examples/images"]]
    assert any("--model" not in argv for argv in labels), "the default model's command"
    assert any(argv[argv.index("--model") + 1] == "tiny-demo" for argv in labels if "--model" in argv)
    assert any(argv[0] == "pytest" for argv in argvs)
    assert ["pip", "install", "torch==2.13.0"] in argvs
    outputs = [Path(argv[3]) for argv in labels]
    assert all(str(out).startswith("~") or out.is_absolute() for out in outputs), "outputs land outside the repo"


def test_the_readme_test_command_is_what_ci_runs():
    """`.ci/run` runs exactly the README's test block (its commands, in order)."""
    blocks = [shell_lines(body) for lang, body in code_blocks(_section(README.read_text(), "Quick start"))
              if lang == "bash"]
    test_block = next(block for block in blocks if _runs_pytest(block))
    ci = [line for line in shell_lines((REPO / ".ci" / "run").read_text().splitlines())
          if not line.startswith(("set ", "cd "))]
    assert ci == test_block


def test_the_quick_start_installs_the_test_extras_only_for_the_tests():
    """Labeling installs the package (`.`); the test command adds its `[test]` extras."""
    blocks = [shell_lines(body) for lang, body in code_blocks(_section(README.read_text(), "Quick start"))
              if lang == "bash"]
    installs = [[argv for line in block for argv in split_commands(line) if argv[:2] == ["pip", "install"]]
                for block in blocks]
    first = installs[0]
    assert ["pip", "install", "-e", "."] in first and not any("[test]" in " ".join(a) for a in first), first
    test_block = next(i for i, block in enumerate(blocks) if _runs_pytest(block))
    assert ["pip", "install", "-e", ".[test]"] in installs[test_block]


@pytest.mark.parametrize("where, argv", _documented_diffseg_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_documented_diffseg_command_parses(where, argv):
    from jobs.cli import build_parser

    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's "error: ..." (exit 2)
        pytest.fail(f"{where}: argparse refused it (exit {exc.code})")
