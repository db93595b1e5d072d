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


def assert_same_update(one, two, start, min_moved=1e-5):
    """Two checkpoints that must hold the same update from `start` (torchrun ranks against one
    process): the run moved the weights at all, and their difference is rounding-level.

    The gradients agree to float rounding, but AdamW's first steps divide by sqrt(v): a weight whose
    gradient is ~1e-9 (rounding-level) moves by up to lr either way. So: the mean difference is tiny
    against the mean movement and only a handful of weights differ at all.
    """
    from safetensors.torch import load_file

    a, b, base = load_file(one), load_file(two), load_file(start)
    assert set(a) == set(b)
    moved = torch.cat([(a[k] - base[k]).abs().flatten() for k in a])
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert moved.mean() > min_moved, "the run did not change the weights: nothing was compared"
    assert diff.mean() < 1e-3 * moved.mean(), (diff.mean(), moved.mean())
    assert (diff > 1e-5).float().mean() < 5e-3
