"""Compiled Triton (3.6 on the GPU) rejects a kernel that reads a module global unless the
global is a ``tl.constexpr``; the CPU interpreter accepts it. This test finds such reads here."""

import dis
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

triton = pytest.importorskip("triton")

import tailattn.kernels  # noqa: E402


def _kernel_modules():
    for info in pkgutil.iter_modules(tailattn.kernels.__path__):
        yield importlib.import_module(f"tailattn.kernels.{info.name}")


def _kernel_source(value):
    """The Python function under a ``@triton.jit`` object (compiled or interpreted), also
    under ``triton.autotune``; None for anything else."""
    for _ in range(2):
        if not type(value).__module__.startswith("triton"):
            return None
        value = getattr(value, "fn", None)
        if inspect.isfunction(value):
            return value
    return None


def _kernels(module):
    for value in vars(module).values():
        fn = _kernel_source(value)
        if fn is not None and fn.__module__ == module.__name__:
            yield fn


def _global_reads(code):
    """Names a function (and the functions nested in it) loads as globals."""
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_GLOBAL":
            yield ins.argval
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _global_reads(const)


def _allowed(value) -> bool:
    """What compiled Triton takes from a kernel's globals: modules, other kernels, constexprs
    and triton.language objects (dtypes, builtins); not plain numbers, strings, tuples, dicts."""
    if value is None or isinstance(value, ModuleType) or _kernel_source(value) is not None:
        return True
    return type(value).__module__.startswith("triton") or getattr(
        value, "__module__", ""
    ).startswith("triton")


def test_kernels_read_only_constexpr_globals():
    kernels = {fn for module in _kernel_modules() for fn in _kernels(module)}
    assert len(kernels) >= 10  # the walk finds the kernels
    bad = [
        f"{fn.__module__}.{fn.__name__} reads {name}={fn.__globals__[name]!r}"
        for fn in kernels
        for name in set(_global_reads(fn.__code__))
        if name in fn.__globals__ and not _allowed(fn.__globals__[name])
    ]
    assert not bad, "non-constexpr globals in @triton.jit functions: " + "; ".join(sorted(bad))
