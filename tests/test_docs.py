"""The README and docs/: the README stays short, every relative link resolves, the README's test command is
the one CI runs, and every Python example over out/ or with PyTorch runs as written on a sample run's out/
(the PyTorch ones on a CPU too, where PyTorch is installed: requirements-dev.txt installs it)."""

import re
import unicodedata
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
README = REPO_DIR / "README.md"
DOCS = sorted((REPO_DIR / "docs").glob("*.md"))
MAX_README_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks (links inside code are code, not links)."""
    lines, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def code_lines(path: Path) -> list[str]:
    lines, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif in_code:
            lines.append(line.strip())
    return lines


def python_examples(path: Path) -> list[tuple]:
    """(line of the fence, code) of every ```python block."""
    examples, code, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if code is None and re.match(r"^```python\s*$", line):
            code, start = [], number
        elif code is not None and FENCE.match(line):
            examples.append((start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return examples


def uses_torch(code: str) -> bool:
    return re.search(r"^\s*import .*\btorch\b", code, re.MULTILINE) is not None


# The examples a reader runs: those over a run's out/ folder, and every PyTorch one (not fragments of the code)
EXAMPLES = [
    (path, line, code)
    for path in [README, *DOCS]
    for line, code in python_examples(path)
    if '"out/' in code or uses_torch(code)
]


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link either
        links += [target for target in LINK.findall(line) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]
    return links


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, result = {}, set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link's text, not its target
        slug = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_docs_exist():
    names = {path.name for path in DOCS}
    assert {"inputs.md", "outputs.md", "cluster.md", "models.md", "design.md"} <= names


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: path.relative_to(REPO_DIR).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_links_are_found():
    """The link finder itself: the README links to every document in docs/."""
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    assert {path.resolve() for path in DOCS} <= linked


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (REPO_DIR / ".ci" / "run").read_text().splitlines()]
    pip = [line for line in ci if line.startswith("python3 -m pip install")]
    pytest_line = [line for line in ci if line.startswith("python3 -m pytest")]
    assert len(pip) == 1 and len(pytest_line) == 1, ".ci/run should have one pip install and one pytest line"
    commands = [line for line in code_lines(README) if "pytest" in line]
    assert commands == [f"{pip[0]} && {pytest_line[0]}"], f"README's test command {commands} is not .ci/run's"


def test_readme_has_no_options_table():
    """--help is the options table; the README only shows how to get it."""
    assert not [line for line in prose_lines(README) if line.startswith("| `--")]
    assert "--help" in README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sample_run_folder(tmp_path_factory):
    """A folder holding out/: the README's sample run (subject_1, with the NWB file the docs read too)."""
    from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli

    folder = tmp_path_factory.mktemp("docs")
    run_cli(
        "--input_dir",
        SAMPLE_DIR,
        "--output_dir",
        folder / "out",
        "--subjects",
        "subject_1",
        "--nwb",
        *OFFLINE_BUILTIN,
        "--split",
        "zapbench",
        "--export",
        "dense,gbm,torch_brain,zapbench",  # what the exports' examples read
    )
    return folder


def test_the_examples_are_found():
    assert len(EXAMPLES) >= 6 and sum(uses_torch(code) for _, _, code in EXAMPLES) >= 3


@pytest.mark.parametrize(
    "path, line, code", EXAMPLES, ids=[f"{path.relative_to(REPO_DIR).as_posix()}:{line}" for path, line, _ in EXAMPLES]
)
def test_python_example_runs_as_written(sample_run_folder, monkeypatch, path, line, code):
    """Each example as a reader copies it: in the folder holding out/, PyTorch examples on this machine's device."""
    if uses_torch(code):
        pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    monkeypatch.chdir(sample_run_folder)
    monkeypatch.syspath_prepend(str(REPO_DIR))
    exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": f"example_{line}"})
