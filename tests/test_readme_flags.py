"""What README.md, README.zh-CN.md and docs/*.md name matches the project: every --flag is in some script's --help,
every link and anchor resolves, every module of support/ is in the README's layout table, every number of a
results table is the one in the committed study.md it cites, and no sentence dates a run or speaks of how the
project was made (issue: a README a newcomer reads in ten minutes)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPTS = ("origin_train.py", "my_train.py", "origin_predict.py", "my_predict.py", "benchmarks/bench.py")
DOCS = sorted([*REPO_ROOT.glob("README*.md"), *(REPO_ROOT / "docs").glob("*.md")])
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")

# Flags of other programs that the pages quote: pip's, torchrun's and curl's.
NON_PROJECT_FLAGS = {"--index-url", "--nproc_per_node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--node-rank", "--data-binary"}

# Sentences about how the project was made rather than about the software.
HISTORY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bUTC\b|\bsessions?\b|\bour machines?\b|\b(?:earlier|previous) "
                     r"(?:version|run|session)s?\b|\bin this version\b|\(none here\)|会话|我们的机器|之前一次|上一版",
                     re.IGNORECASE)

# The study.md columns under another name in README.zh-CN.md.
HEADER_NAMES = {"预设": "preset", "像素精度": "pixel acc", "平均类别精度": "mean class acc"}


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.fixture(scope="session")
def script_flags() -> set[str]:
    """Every flag that the scripts' --help shows (each --help once, in parallel)."""
    env = dict(os.environ, COLUMNS="200")   # wide enough that argparse wraps no flag

    def help_text(script: str) -> str:
        done = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{script} --help failed: {done.stderr}"
        return done.stdout

    with ThreadPoolExecutor(len(SCRIPTS)) as pool:
        return {flag for text in pool.map(help_text, SCRIPTS) for flag in FLAG.findall(text)}


def test_every_flag_the_pages_name_is_in_some_scripts_help(script_flags):
    assert {"--demo", "--tile-overlap", "--presets", "--no-hflip"} <= script_flags   # the parse works
    unknown = {f"{relative(doc)}: {flag}" for doc in DOCS for flag in FLAG.findall(doc.read_text())
               if flag not in script_flags | NON_PROJECT_FLAGS}
    assert not unknown, "flags that no script's --help knows:\n" + "\n".join(sorted(unknown))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{relative(doc)}: {target} (no such file)")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
                broken.append(f"{relative(doc)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_layout_table_names_every_support_module():
    modules = sorted(p.stem for p in (REPO_ROOT / "support").glob("*.py") if p.stem != "__init__")
    assert "training" in modules
    for readme in ("README.md", "README.zh-CN.md"):
        row = next(line for line in (REPO_ROOT / readme).read_text().splitlines() if line.startswith("| `support/`"))
        missing = [m for m in modules if f"`{m}`" not in row]
        assert not missing, f"{readme}: the support/ row does not name {missing}"


def markdown_tables(text: str) -> list[tuple[int, list[list[str]]]]:
    """Each table of a page as (the character offset where it starts, its rows of cells), separator rows dropped."""
    tables, offset, current = [], 0, None
    for line in text.splitlines(keepends=True):
        if line.startswith("|"):
            if current is None:
                current = (offset, [])
                tables.append(current)
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                current[1].append(cells)
        else:
            current = None
        offset += len(line)
    return tables


def study_values(path: Path) -> dict[str, dict[str, str]]:
    """preset -> {column: cell} of a study.md's metric columns (main table from 'pixel acc' on, per-class IoU)."""
    values: dict[str, dict[str, str]] = {}
    for _, (head, *rows) in markdown_tables(path.read_text()):
        first = head.index("pixel acc") if "pixel acc" in head else 1
        for row in rows:
            values.setdefault(row[0], {}).update(zip(head[first:], row[first:]))
    return values


def test_results_tables_match_the_study_they_cite():
    studies = {p.resolve(): study_values(p) for p in (REPO_ROOT / "pictures").rglob("study.md")}
    assert len(studies) >= 2 and "fcn-sgd-1e-3" in studies[(REPO_ROOT / "pictures" / "study.md").resolve()]
    presets = {name for values in studies.values() for name in values}
    metrics = {column for values in studies.values() for row in values.values() for column in row}
    wrong, checked = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for start, (head, *rows) in markdown_tables(text):
            columns = [HEADER_NAMES.get(h, h) for h in head]
            named = [(re.findall(r"`([^`]+)`", row[0]) or [""])[0] for row in rows]
            metric = [i for i, c in enumerate(columns) if c in metrics]
            if not set(named) & presets or not metric:
                continue   # not a table of presets, or one without results
            cited = re.findall(r"\]\(([^)\s]*pictures/[^)\s]*study\.md)\)", text[:start])
            assert cited, f"{relative(doc)}: a results table ({head}) cites no pictures/.../study.md before it"
            study = studies.get((doc.parent / cited[-1]).resolve())
            assert study is not None, f"{relative(doc)}: {cited[-1]} is not a committed study.md"
            for name, row in zip(named, rows):
                if not name or " " in name:
                    continue   # a run beside the study, named in words or by its command: measured by its own --eval
                for i in metric:
                    expected = study.get(name, {}).get(columns[i])
                    checked += 1
                    if row[i].strip("*") != expected:
                        wrong.append(f"{relative(doc)}: {name}, {columns[i]}: {row[i]} (the study: {expected})")
    assert checked > 100, "the pages lost their results tables"
    assert not wrong, "\n".join(wrong)


def test_no_sentence_dates_a_run_or_tells_how_the_project_was_made():
    found = [f"{relative(doc)}: ...{doc.read_text()[max(m.start() - 40, 0):m.end() + 40]!r}..."
             for doc in DOCS for m in HISTORY.finditer(doc.read_text())]
    assert not found, "\n".join(found)
