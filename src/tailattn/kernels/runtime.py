"""Where the kernels run: compiled for a CUDA GPU, or in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, how the tests run them without a GPU).

Tested versions: the compiled kernels with Triton 3.6 (an H200, PyTorch 2.11); the interpreter
with Triton 3.9. The interpreter of Triton 3.6 cannot use a value loaded from memory as a loop
bound (the CSR row lengths of the block-sparse kernel, the k-means segments), so the kernels
refuse to run in it with a clear reason instead of failing deep inside it.
"""

from __future__ import annotations

import os

import triton

INTERPRETER_MIN_VERSION = (3, 9)


def interpreting() -> bool:
    """Kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem() -> str | None:
    """Why the kernels cannot run in this interpreter (``None`` when they can or when compiled)."""
    if not interpreting():
        return None
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < INTERPRETER_MIN_VERSION:
        wanted = ".".join(map(str, INTERPRETER_MIN_VERSION))
        return f"the Triton {triton.__version__} interpreter (CPU runs need triton>={wanted})"
    return None
