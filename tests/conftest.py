"""
Shared test setup: make Triton's interpreter usable on CPU-only machines.

Triton builds its own library functions (tl.sum, tl.max, ...) as interpreted or compiled functions
at the moment `triton` is first imported, depending on TRITON_INTERPRET; transformers imports
triton, so by the time tests/test_kernels.py runs it is too late. Import triton here, under
TRITON_INTERPRET=1, before any test module, then put the variable back: everything else keeps
the fast CPU reference path, and tests/test_kernels.py turns the interpreter on for its own tests.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# tiny random models of the other listed families, built from configs around the tiny world's tokenizer


def _special_ids(tok):
    return {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>")}


def qwen3_vl(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = _special_ids(tok)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=64 * (len(tok) // 64 + 1), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True), tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def qwen2_5_vl(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _special_ids(tok)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64 * (len(tok) // 64 + 1), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                         tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def untied_tiny_base(path):
    """The shipped tiny base with its LM head untied from the embeddings (the LM head a copy of them),
    saved as a score model at `path`: the layout of Qwen3.5-9B / 27B, whose embeddings are untied."""
    from model import ScoreModel

    src = ScoreModel.load(os.path.join(ROOT, "assets", "tiny_base.safetensors"))
    config = src.vlm.config
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    vlm = type(src.vlm)(config)
    state = src.vlm.state_dict()
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    vlm.load_state_dict(state)
    model = ScoreModel(vlm.eval(), src.tokenizer, src.image_processor, source="tiny")
    model.prompt_version = src.prompt_version
    assert model.vlm.get_output_embeddings().weight is not model.vlm.get_input_embeddings().weight
    model.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The 12-prompt tiny world (seed 0) that the GDSO tests train on, rendered once per session and only
    read; a test module that needs another world defines its own `world`, which takes precedence."""
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world12")
    make_world(str(out), n=12, seed=0)
    return str(out)


def run_script(script, args, nproc=1, env_extra=None, check=True, timeout=300):
    """`python SCRIPT ARGS` from the repository root, under torchrun with `nproc` > 1, one thread per
    process -> the CompletedProcess; with check, the test fails (with the output's tail) unless it
    exits 0. `script`: a repository file name or a path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env_extra or {}))
    path = os.path.join(ROOT, str(script))  # an absolute path stays itself
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    res = subprocess.run([sys.executable, *launch, path, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res
