"""
Shared test setup: make Triton's interpreter usable on CPU-only machines.

Triton builds its own library functions (tl.sum, tl.max, ...) as interpreted or compiled functions
at the moment `triton` is first imported, depending on TRITON_INTERPRET; transformers imports
triton, so by the time tests/test_kernels.py runs it is too late. Import triton here, under
TRITON_INTERPRET=1, before any test module, then put the variable back: everything else keeps
the fast CPU reference path, and tests/test_kernels.py turns the interpreter on for its own tests.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:  # no triton: tests/test_kernels.py skips itself
        pass
    finally:
        if _old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _old
