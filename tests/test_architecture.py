"""The core/lab split (docs/architecture.md): the core imports nothing of the lab, and importing
the package or its command pulls in no heavy dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tailattn"
LAB = (
    "tailattn.__main__",
    "tailattn.cli",
    "tailattn.bench",
    "tailattn.study",
    "tailattn.data",
    "tailattn.toy",
)
"""The lab: what we use to study, demonstrate and measure the core (``python -m tailattn`` is
the command too)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def is_lab(module: str) -> bool:
    return any(module == lab or module.startswith(lab + ".") for lab in LAB)


def core_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not is_lab(module_name(p))]


def test_the_lab_packages_exist():
    names = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert all(lab in names for lab in LAB)
    assert len(core_files()) > 20


@pytest.mark.parametrize("path", core_files(), ids=lambda p: module_name(p))
def test_core_imports_nothing_of_the_lab(path):
    lab = sorted(m for m in imported_modules(path) if m.startswith("tailattn") and is_lab(m))
    assert not lab, f"{module_name(path)} (core) imports the lab: {lab}"


def test_kernels_import_no_reference_code():
    for path in (PACKAGE / "kernels").glob("*.py"):
        imported = imported_modules(path)
        assert not any(m.startswith("tailattn.reference") for m in imported), path.name


def loaded_after(statement: str) -> set[str]:
    """Top-level modules present in a fresh interpreter after ``statement``."""
    show = "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    code = f"import sys; {statement}; {show}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_tailattn_is_light():
    loaded = loaded_after("import tailattn")
    assert not loaded & {"torch", "diffusers", "typer", "rich", "matplotlib", "triton"}


def test_the_command_starts_without_torch():
    # `tailattn --help` imports the command and typer/rich only; torch loads inside a command
    loaded = loaded_after("import tailattn.cli")
    assert "typer" in loaded
    assert not loaded & {"torch", "diffusers", "matplotlib", "triton"}


def test_using_the_api_loads_the_registry():
    code = (
        "from tailattn.methods import registry; "
        "assert {'topk', 'block-topk', 'svg2', 'rectified'} <= set(registry.selections()); "
        "assert 'uta' in registry.tails('block')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "module",
    ["tailattn.tails.block", "tailattn.reference", "tailattn.select.rectified", "tailattn.execute"],
)
def test_any_core_module_imports_first(module):
    # no import cycle, whichever module a user (or the registry) imports first
    code = f"import {module}; from tailattn.methods import registry; registry.tails('block')"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kernels_load_no_reference_and_no_selection_code():
    # transitively: what importing every kernel module pulls in
    pytest.importorskip("triton")
    modules = [f"tailattn.kernels.{p.stem}" for p in (PACKAGE / "kernels").glob("*.py")]
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys; import {', '.join(modules)}; print(*sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not [m for m in loaded if m.startswith(("tailattn.reference", "tailattn.select"))]
