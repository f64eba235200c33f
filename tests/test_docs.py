"""The documentation is true: README.md, RESULTS.md and docs/ say what the code does.

- Every ```python block of README.md and of each page of docs/ runs as written: a file's blocks in
  order, in one namespace of their own (as a doctest session does), in a temporary working folder, with
  a temporary cache (``DIT_LENS_CACHE``). A block may be left out only for the one reason
  `NOT_RUN_REASON`, marked by an HTML comment on the line above it, and only the blocks listed in
  `NOT_RUN` are.
- Every block names its language, so none escapes these checks.
- Every shell command (and every command quoted in the text) that runs ``dit-lens`` parses with the
  command line's own parser (`dit_lens.apps.cli.parser`), and a study's flags (``dit-lens study NAME ...``
  or ``python studies/NAME.py ...``) with that study's own; a ``python`` script named in a command exists.
- The README stays short (`README_MAX_LINES`) and links into docs/; every relative link resolves.
- ``mkdocs build --strict`` builds the site without a warning.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "RESULTS.md"
README_MAX_LINES = 300
#: The one reason a block may be left out: it loads a real checkpoint that this machine does not hold.
NOT_RUN_REASON = "needs model weights on disk"
#: The blocks left out, by file and first line. Keep this list short: every other block runs.
NOT_RUN = {
    ("docs/models.md", 'lens = dit_lens.load("/models/PixArt-XL-2-512x512", lora="/models/kvasir-lora",'),
}
#: Shell languages whose ``dit-lens`` and ``python`` commands are checked.
SHELL = ("bash", "sh", "console", "shell")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the first line of code, 1-based
    language: str
    code: str
    note: str | None  # the HTML comment on the line above the fence, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^( *)(`{3,}|~{3,})(.*)$")
NOTE = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their language and the comment above them."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        note = NOTE.match(above)
        found.append(Block(path, i + 2, info.strip().split(" ")[0], code + "\n", note.group(1) if note else None))
        i = end + 1
    return found


def python_files() -> list[Path]:
    return [p for p in doc_files() if any(b.language == "python" for b in blocks(p))]


def left_out(block: Block) -> bool:
    return block.note is not None and block.note.startswith("not run")


def test_every_block_names_its_language():
    """A block without a language is neither run nor checked: each says what it is."""
    unnamed = [b.where for p in [*doc_files(), RESULTS] for b in blocks(p) if not b.language]
    assert not unnamed, f"fenced blocks without a language (write ```python, ```bash or ```text): {unnamed}"


def test_blocks_left_out_are_few_and_for_one_reason():
    marked = [b for p in doc_files() for b in blocks(p) if left_out(b)]
    for b in marked:
        assert b.language == "python", f"{b.where}: only python blocks run, so only they can be marked not run"
        assert b.note == f"not run: {NOT_RUN_REASON}", \
            f"{b.where}: a block may be left out only because it {NOT_RUN_REASON}, not {b.note!r}"
    listed = {(str(b.path.relative_to(ROOT)), b.code.splitlines()[0]) for b in marked}
    assert listed == NOT_RUN, f"blocks left out differ from NOT_RUN: marked {sorted(listed - NOT_RUN)}, " \
                              f"listed but not marked {sorted(NOT_RUN - listed)}"
    assert len(NOT_RUN) <= 3


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory) -> Path:
    """One temporary cache for every file's blocks: captures are content-addressed, so a vector two pages
    compute alike is computed once, and what each block gets is what it would get alone."""
    return tmp_path_factory.mktemp("docs-cache")


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch, docs_cache):
    """A file's python blocks run in order in one fresh namespace, in a temporary folder and cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIT_LENS_CACHE", str(docs_cache))
    module = types.ModuleType("docs_session")  # a module, so classes the blocks define work as in a script
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    ran = 0
    try:
        for block in blocks(path):
            if block.language != "python" or left_out(block):
                continue
            # Padded so a traceback names the line of the Markdown file.
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"the block at {block.where} fails: {type(err).__name__}: {err}") from err
            ran += 1
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a local cluster a page started
            sys.modules["ray"].shutdown()
    assert ran


# ---------------------------------------------------------------------------------------------------------
# shell commands


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at && ; |."""
    text = re.sub(r"\\\n", " ", code)
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "|", "||"):
                if current:
                    found.append(current)
                current = []
            elif current or not re.match(r"^[A-Z_]+=", word):  # VAR=value before a command sets its environment
                current.append(word)
    return found


def study_parser(name: str):
    """The parser of ``studies/<name>.py``: the study engine's for a declared `Study`, else the file's own."""
    from dit_lens.study.cli import find_study, parser

    path = find_study(name)
    names = runpy.run_path(str(path), run_name="__docs__")
    if "STUDY" in names:
        return parser(names["STUDY"]).parse_args
    if "parse" in names:  # a study with its own engine: parse(argv) reads and validates its flags
        return names["parse"]
    return None


def check_study(name: str, argv: list[str]) -> None:
    parse = study_parser(name)
    if parse is not None:
        parse(argv)


def check(argv: list[str]) -> None:
    """Parse one command as its program would; SystemExit with a non-zero code is a wrong command."""
    from dit_lens.apps.cli import parser

    if argv[0] == "dit-lens":
        args = parser().parse_args(argv[1:])
        if args.command == "study":
            check_study(args.name, args.rest)
    elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        script = Path(argv[1])
        assert (ROOT / script).is_file() or (ROOT / "benchmarks" / script).is_file(), f"no script {script}"
        if script.parts[0] == "studies":
            check_study(script.stem, argv[2:])


INLINE = re.compile(r"(?<!`)`((?:dit-lens|python|cd benchmarks &&) [^`]+)`(?!`)")


def inline_commands(path: Path) -> list[tuple[str, str]]:
    """Commands quoted in the text (``python studies/dye.py --alphas 2``), with their line; a span may
    wrap onto the next line. Spans naming a placeholder (``<name>``, ``DIR``, ``...``) are left out."""
    text = re.sub(r"(?ms)^ *```.*?^ *```", lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    found = []
    for match in INLINE.finditer(text):
        code = " ".join(match.group(1).split())
        if not re.search(r"<|\.\.\.|…|\|", code):
            found.append((f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}", code))
    return found


def shell_commands() -> list[tuple[str, list[str], bool]]:
    """Every ``dit-lens`` and ``python`` command of the shell blocks (whole: True), and those quoted in the
    text, which may name a command without the arguments it requires (whole: False)."""
    quoted = [(where, code, False) for p in [*doc_files(), RESULTS] for where, code in inline_commands(p)]
    fenced = [(b.where, b.code, True) for p in [*doc_files(), RESULTS] for b in blocks(p) if b.language in SHELL]
    return [(where, argv, whole) for where, code, whole in [*fenced, *quoted] for argv in commands(code)
            if argv[0] in ("dit-lens", "python", "python3")]


def test_shell_commands_parse(capsys):
    wrong = []
    for where, argv, whole in shell_commands():
        try:
            check(argv)
        except SystemExit as exit_:
            error = capsys.readouterr().err.strip()
            if exit_.code and (whole or "the following arguments are required" not in error):
                wrong.append(f"{where}: {shlex.join(argv)}: {error}")
        except (AssertionError, ValueError, FileNotFoundError) as err:
            wrong.append(f"{where}: {shlex.join(argv)}: {err}")
    assert not wrong, "commands that do not parse:\n" + "\n".join(wrong)
    assert any(argv[0] == "dit-lens" and whole for _, argv, whole in shell_commands())


def test_a_wrong_flag_is_caught(capsys):
    """The check above can fail: a flag the demo does not have is refused."""
    with pytest.raises(SystemExit):
        check(["dit-lens", "demo", "--alphas", "3"])
    with pytest.raises(SystemExit):
        check(["python", "studies/layer_sweep.py", "--alpha", "3"])


# ---------------------------------------------------------------------------------------------------------
# README length and links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img [^>]*src=\"([^\"]+)\"")


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"(?s)```.*?```", "", path.read_text())  # code blocks hold no links
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_short_and_links_into_docs():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES} " \
                                           f"and move the manual to docs/, the measurements to RESULTS.md"
    targets = relative_links(README)
    assert "docs/index.md" in targets and "RESULTS.md" in targets


def test_relative_links_resolve():
    broken = []
    for path in [*doc_files(), RESULTS]:
        for target in relative_links(path):
            file = target.split("#")[0]
            if file and not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, dict):
            return set().union(*(pages(v) for v in nav.values()))
        return set().union(*(pages(v) for v in nav))

    docs = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages(config["nav"]) == docs


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[test]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[test]'")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "WARNING" not in run.stderr, run.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
