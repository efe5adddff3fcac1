"""The docs stay honest: a short README, links that resolve, snippets that run, commands that exist.

Covers README.md, BENCHMARKS.md and every markdown file under docs/:

- README.md has at most 200 lines;
- every relative link and image resolves, and a ``#anchor`` names a heading of its target;
- repository files (``tests/...``, ``tailattn/...``) and dotted names (``tailattn.select.X``)
  named in code spans exist; no internal method labels, no missing DESIGN/METHODS files, no
  ``pip install tailattn`` (the package is not on PyPI);
- ``make``, ``tailattn``, ``python`` and ``pip install -e`` commands name existing Makefile
  targets, CLI commands and options, modules, scripts and extras;
- Python blocks of the README run as written, each in a fresh namespace; a block preceded by an
  HTML comment ``<!-- test: skip (REASON) -->`` is skipped with that reason (for the few that
  need a diffusers pipeline or CUDA). Python blocks elsewhere must at least compile.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(?P<title>.+?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def blank_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked out (line numbers kept)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), text)


def fenced_blocks(path: Path) -> list[tuple[str, str, int, str | None]]:
    """(language, code, line number, skip reason or None) of every fenced block."""
    text = read(path)
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        reason = skip.group("reason") if skip else None
        blocks.append((match.group(1), match.group(2), line, reason))
    return blocks


def slug(title: str) -> str:
    """GitHub's anchor of a heading: rendered text, lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # links: their text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", read(path))):
        base = slug(match.group("title"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return frozenset(result)


def test_readme_is_short():
    lines = read(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_links_and_images_resolve(path: Path):
    text = blank_code(read(path))
    broken = []
    for match in LINK.finditer(text):
        target = match.group("target")
        if target.startswith(EXTERNAL):
            continue
        line = text.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"line {line}: {target} points outside the repository")
        elif not resolved.exists():
            broken.append(f"line {line}: {target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"line {line}: {target}: no heading #{anchor} in {rel(resolved)}")
    assert not broken, f"{rel(path)}:\n" + "\n".join(broken)


SOURCE_PATH = re.compile(
    r"^(?P<path>(?:src|tests|scripts|examples|tailattn)/[\w./*-]+?)(?:::[\w\[\]-]+)?/?$"
)


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_named_source_files_exist(path: Path):
    """Files of the repository named in code spans (`tests/test_x.py`,
    `tailattn/select/dfs.py`, ...) exist; `tailattn/...` is read under src/."""
    missing = []
    text = FENCE.sub("", read(path))
    for match in INLINE_CODE.finditer(text):
        found = SOURCE_PATH.match(match.group(2).strip())
        if found is None:
            continue
        name = found.group("path")
        base = ROOT / "src" if name.startswith("tailattn/") else ROOT
        if not list(base.glob(name)):
            missing.append(name)
    assert not missing, f"{rel(path)} names files that do not exist: {missing}"


DOTTED = re.compile(r"^(?P<name>tailattn(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$", re.S)


def resolve(name: str) -> object:
    """The object a dotted name such as ``tailattn.select.DFSState`` refers to; None when it
    needs an optional dependency that is not installed."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as err:
            if err.name is not None and not err.name.startswith("tailattn"):
                return None
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_named_python_objects_exist(path: Path):
    """Dotted names in code spans (`tailattn.select.DFSState`, `tailattn.toy.capture.
    write_toy_capture(path)`, ...) are importable modules or their attributes."""
    missing = []
    for match in INLINE_CODE.finditer(FENCE.sub("", read(path))):
        found = DOTTED.match(match.group(2).strip())
        if found is None:
            continue
        try:
            resolve(found.group("name"))
        except (ImportError, AttributeError) as err:
            missing.append(f"{found.group('name')} ({err})")
    assert not missing, f"{rel(path)} names objects that do not exist: {missing}"


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_no_dangling_names(path: Path):
    """No internal labels for published methods, no files outside the repository, and no
    install command for a package that is not on PyPI."""
    text = read(path)
    problems = re.findall(r"\bseeds?[ _]?0\d\d\b", text, re.I)
    problems += re.findall(r"\b(?:DESIGN|METHODS)\.md\b", text)
    problems += re.findall(r"pip install\s+['\"]?tailattn\b", text)
    assert not problems, f"{rel(path)}: {problems}"


def python_blocks(path: Path) -> list:
    return [
        pytest.param(code, reason, id=f"line{line}")
        for language, code, line, reason in fenced_blocks(path)
        if language == "python"
    ]


@pytest.mark.parametrize(("code", "skip_reason"), python_blocks(README))
def test_readme_python_block_runs(code: str, skip_reason: str | None):
    if skip_reason is not None:
        pytest.skip(skip_reason)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_snippet"})


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_python_blocks_compile(path: Path):
    for language, code, line, _ in fenced_blocks(path):
        if language == "python":
            compile(code, f"{rel(path)}:{line}", "exec")


def shell_commands(path: Path) -> list[list[str]]:
    """Commands of the bash blocks (continuations joined, comments dropped) and of inline code
    spans that start with make, tailattn or python, as argument lists without VAR=value."""
    lines = []
    for language, code, _, _ in fenced_blocks(path):
        if language in ("bash", "sh", "shell", "console"):
            lines += code.replace("\\\n", " ").splitlines()
    text = FENCE.sub("", read(path))
    lines += [
        m.group(2)
        for m in INLINE_CODE.finditer(text)
        if re.match(r"(make|tailattn|python) ", m.group(2))
    ]
    commands = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an inline span cut mid-quote: not a whole command
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


@cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w.-]+):", read(ROOT / "Makefile"), re.M))


@cache
def cli_commands() -> dict[str, set[str] | None]:
    """``tailattn`` subcommands and their options (None: a stub without the optional extra)."""
    import typer.main

    from tailattn.cli import app

    group = typer.main.get_command(app)
    result: dict[str, set[str] | None] = {}
    for name, command in group.commands.items():
        options = {opt for param in command.params for opt in param.opts if opt.startswith("-")}
        stub = command.context_settings.get("ignore_unknown_options", False)
        result[name] = None if stub else options | {"--help"}
    return result


@cache
def extras() -> frozenset[str]:
    section = read(ROOT / "pyproject.toml").split("[project.optional-dependencies]", 1)[1]
    section = section.split("\n[", 1)[0]
    return frozenset(re.findall(r"^([\w-]+)\s*=", section, re.M))


def check_command(words: list[str]) -> str | None:
    """Why the command cannot run as written (None when it can, as far as is checked here)."""
    program, args = words[0], words[1:]
    if program == "make":
        unknown = [t for t in args if not t.startswith("-") and t not in make_targets()]
        return f"no Makefile target {unknown}" if unknown else None
    if program == "tailattn":
        if not args or args[0].startswith("-") or not args[0].islower():
            return None  # `tailattn --help`, or a placeholder such as COMMAND
        if args[0] not in cli_commands():
            return f"no command {args[0]!r} (tailattn has {sorted(cli_commands())})"
        options = cli_commands()[args[0]]
        if options is None:
            return None
        unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--")]
        unknown = [a for a in unknown if a not in options]
        return f"unknown options {unknown} of tailattn {args[0]}" if unknown else None
    if program == "python":
        if args[:1] == ["-m"] and len(args) > 1:
            module = ROOT / "src" / args[1].replace(".", "/")
            if args[1] != "pytest" and not (
                module.with_suffix(".py").exists() or (module / "__main__.py").exists()
            ):
                return f"no module {args[1]}"
        elif args and args[0].endswith(".py") and not (ROOT / args[0]).exists():
            return f"no script {args[0]}"
    if program == "pip" and args[:1] == ["install"]:
        for arg in args[1:]:
            found = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if found:
                unknown = set(found.group(1).split(",")) - extras()
                if unknown:
                    return f"no extra {sorted(unknown)} in pyproject.toml"
    return None


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_commands_exist(path: Path):
    problems = []
    for words in shell_commands(path):
        reason = check_command(words)
        if reason is not None:
            problems.append(f"{shlex.join(words)}: {reason}")
    assert not problems, f"{rel(path)}:\n" + "\n".join(problems)


def test_readme_shows_the_two_commands():
    commands = [" ".join(words) for words in shell_commands(README)]
    assert "make demo" in commands and "make test" in commands
