"""
Triton kernels of Z-Reward, each file self-contained: PyTorch reference, Triton forward and
backward kernels, host launchers, an autograd.Function and one public function.

    score.py    softmax / expectation / std / CE (Eq. 8) / KL (Eq. 15) over the K score bins
    gap.py      the G x G pairwise gap loss (Eq. 11) and pairwise rewards (Eq. 10) of GDSO
    logprob.py  fused linear token log-prob (+ entropy) that never forms the (T, V) logits

Dispatch: the public functions run Triton on CUDA tensors and the PyTorch reference on CPU
tensors, unless TRITON_INTERPRET=1, in which case the Triton path runs on CPU through Triton's
interpreter (slow; for tests). The variable must be set before this package is imported, because
@triton.jit decides at decoration time whether it builds an interpreted function.

Each file is self-contained on purpose, its few helpers (`_use_triton`, `_acc_dtype`, the
`_round_bf16_nearest_even` device function) included: the CPU tests load a private copy of each
file under TRITON_INTERPRET=1 so that its kernels become interpreted functions, and a @triton.jit
helper imported from a shared module would stay compiled, which an interpreted kernel cannot call.

The package is named zr_kernels, not kernels: since transformers 5.25 Hugging Face's `kernels`
package is one of its requirements, and a top-level `kernels/` here would be imported in its place
by every script run from the repository root.
"""

from zr_kernels.gap import gap_l1, gap_l1_ref
from zr_kernels.logprob import token_logprobs, token_logprobs_naive, token_logprobs_ref
from zr_kernels.score import score_ce, score_fused, score_kl, score_ref, score_stats

__all__ = [
    "score_stats", "score_ce", "score_kl", "score_fused", "score_ref",
    "gap_l1", "gap_l1_ref",
    "token_logprobs", "token_logprobs_ref", "token_logprobs_naive",
]
