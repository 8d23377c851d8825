"""The README is a front door: small, every link in it and in docs/*.md lands somewhere, every command runs.

Commands: README's code blocks hold only the two commands (`bash scripts/demo.sh`, `bash scripts/test.sh`) and the
five-minute tour, which tests/integration/test_readme_tour.py runs line by line. Links: every relative link in
README.md and docs/*.md names an existing file and, for `#anchor`, a heading of that file under GitHub's rules.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MAX_README_BYTES = 15_000
TWO_COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")
TOUR_HEADING = "## Five-minute tour"

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(lines outside fenced code blocks, [(info string, lines) of each fenced block]) of a markdown text."""
    prose, blocks, fence, body, info = [], [], None, [], ""
    for line in text.splitlines():
        match = _FENCE.match(line.strip()) if fence is None or line.strip().startswith(fence) else None
        if fence is None and match:
            fence, info, body = match.group(1), match.group(2), []
        elif fence is not None and match and line.strip() == fence[0] * len(line.strip()):
            blocks.append((info, body))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    assert fence is None, "unclosed code fence"
    return prose, blocks


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: markup dropped, lowercase, punctuation other than '-' and '_' dropped,
    spaces to '-' (duplicates get -1, -2, ... in anchors_of)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: Counter[str] = Counter()
    anchors = set()
    for line in prose:
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = github_anchor(match.group(1))
            anchors.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return anchors


def relative_links(path: Path) -> list[str]:
    """Link targets in the prose of a markdown file (not in code), minus absolute URLs."""
    prose, _ = split_fences(path.read_text())
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)  # inline code is not a link
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


def command_lines(lines: list[str]) -> list[str]:
    """Shell commands of a code block: continuation lines joined, comments and blank lines dropped."""
    commands, pending = [], ""
    for line in lines:
        line = line.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(re.sub(r"\s+#.*$", "", command))  # a trailing comment
    assert not pending, "a code block ends in a line continuation"
    return commands


def readme_code_blocks() -> list[tuple[str, list[str]]]:
    return split_fences(README.read_text())[1]


def tour_commands() -> list[str]:
    """The commands of the README's five-minute tour: the first ```bash block after its heading."""
    text = README.read_text()
    assert TOUR_HEADING in text, f"README has no '{TOUR_HEADING}' section"
    _, blocks = split_fences(text.split(TOUR_HEADING, 1)[1])
    info, lines = blocks[0]
    assert info == "bash", f"the tour's first code block is ```{info}, not ```bash"
    return command_lines(lines)


# ---------------------------------------------------------------------------------------------------------------


def test_readme_is_small():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {MAX_README_BYTES})"


def test_every_relative_link_resolves():
    broken = [f"{path.relative_to(REPO)}: {b}" for path in markdown_files() for b in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_links_and_anchors():
    # Guards against a check that passes because it found nothing.
    assert len(relative_links(README)) >= 15
    assert {"two-commands", "five-minute-tour"} <= anchors_of(README)
    assert github_anchor("Resharding: continuing in another parallel layout") == \
        "resharding-continuing-in-another-parallel-layout"
    assert github_anchor("Transformer-XL: memory against none (`bench/txl_memory.py`)") == \
        "transformer-xl-memory-against-none-benchtxl_memorypy"
    assert github_anchor("`metrics.prometheus`") == "metricsprometheus"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert (REPO / "BENCHMARKS.md").resolve() in linked


def test_readme_code_blocks_hold_only_the_two_commands_and_the_tour():
    tour = tour_commands()
    assert tour and all(c.startswith("pretrain ") for c in tour), tour
    allowed = set(TWO_COMMANDS) | set(tour)
    blocks = readme_code_blocks()
    assert all(info == "bash" for info, _ in blocks), [info for info, _ in blocks]
    commands = [c for _, lines in blocks for c in command_lines(lines)]
    stray = [c for c in commands if c not in allowed]
    assert not stray, f"README commands that no test or demo runs: {stray}"
    assert set(TWO_COMMANDS) <= set(commands)
    for command in TWO_COMMANDS:
        assert (REPO / command.split()[1]).is_file()
    # .ci/run runs the second command, as the README says.
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_tour_goes_from_tokenizer_to_generation():
    subcommands = [" ".join(c.split()[1:3]) for c in tour_commands()]
    order = ["tokenizer train", "data prepare", "train configs/debug/gpt_tiny.yaml", "eval --checkpoint",
             "generate --checkpoint"]
    positions = [next(i for i, s in enumerate(subcommands) if s.startswith(o)) for o in order]
    assert positions == sorted(positions), subcommands
    assert any("--bundled valid" in c for c in tour_commands())  # evaluation on the held-out plays
