"""
Tests of the score model (model.py): bins, the score head, batching, checkpoints, loading real
architectures from a local folder, and the differentiable preprocessing.

    python -m pytest tests/test_model.py -q

Everything runs on CPU with tiny models built from configs; nothing is downloaded.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_world
from conftest import qwen3_vl
from model import BINS, DIMENSIONS, ScoreModel, preprocess_differentiable, read_checkpoint, write_checkpoint
from tiny_world import build_tiny_tokenizer, tiny_image_processor


@pytest.fixture(scope="module")
def tiny():
    return tiny_world.tiny_score_model(seed=0)


def _images(n, size=(64, 64), seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle top left", "a blue square bottom right and a green triangle top left", "a yellow cross"]


def test_bins_are_the_half_point_grid():
    assert BINS == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    assert DIMENSIONS == ("alignment", "realism", "aesthetics", "plausibility")


def test_tiny_is_deterministic_and_small(tiny):
    other = tiny_world.tiny_score_model(seed=0)
    for (k, a), (_, b) in zip(tiny.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    assert not torch.equal(tiny_world.tiny_score_model(seed=1).vlm.lm_head.weight, tiny.vlm.lm_head.weight)


def test_a_tokenizer_that_splits_a_bin_is_refused(tiny):
    tok = build_tiny_tokenizer()
    # teach the tokenizer to glue "1" to something: a vocabulary where "5" is not a token at all
    # is not possible with byte-level BPE, so instead wrap encode to split one bin into two tokens
    real_encode = tok.encode

    def split_five(text, **kw):
        ids = real_encode(text, **kw)
        return ids + ids if text == "5" else ids

    tok.encode = split_five
    with pytest.raises(ValueError, match=r"bin 3\.0 \(token '5'\) is not a single token"):
        ScoreModel(tiny.vlm, tok, tiny_image_processor())


def test_a_tokenizer_without_a_bin_token_is_refused(tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    vocab = {t: i for i, t in enumerate(["[UNK]", "1", "2", "3", "4", "6", "7", "8", "9", "<|image_pad|>",
                                          "<|im_end|>", "<|endoftext|>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = TokenizersBackend(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"bin 3\.0 \(token '5'\) is not in this tokenizer's vocabulary"):
        ScoreModel(tiny.vlm, tok, tiny_image_processor())


def test_distribution_sums_to_one_and_mean_in_range(tiny):
    for dim in DIMENSIONS:
        out = tiny.score(PROMPTS, _images(3), dim)
        assert out.probs.shape == (3, 9)
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(3))
        assert ((out.mean >= 1) & (out.mean <= 5)).all()
        assert (out.std >= 0).all() and (out.std <= 2).all()
        expected_mu = (out.probs * torch.tensor(BINS)).sum(-1)
        torch.testing.assert_close(out.mean, expected_mu)


def test_score_head_equals_full_lm_head_restricted_to_bins(tiny):
    batch = tiny.encode(PROMPTS, _images(3), "realism")
    with torch.no_grad():
        full = tiny.vlm(**tiny._model_inputs(batch)).logits[:, -1]  # (B, V), the whole vocabulary
        idx = torch.full((3,), batch["prompt_len"] - 1)
        ours = tiny(batch, idx)["score_logits"]
    torch.testing.assert_close(ours, full[:, tiny.bin_ids].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.distribution(ours).probs, full[:, tiny.bin_ids].float().softmax(-1))


def test_batch_padding_does_not_change_scores(tiny):
    together = tiny.score(PROMPTS, _images(3), "alignment").probs
    alone = torch.cat([tiny.score([p], [im], "alignment").probs for p, im in zip(PROMPTS, _images(3))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    chunked = tiny.score(PROMPTS, _images(3), "alignment", batch_size=2).probs
    torch.testing.assert_close(together, chunked, rtol=1e-4, atol=1e-5)


def test_score_has_gradient_in_grad_mode_only(tiny):
    out = tiny.score(PROMPTS[:1], _images(1), "aesthetics")
    out.mean.sum().backward()
    assert tiny.vlm.lm_head.weight.grad is not None and tiny.vlm.lm_head.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not tiny.score(PROMPTS[:1], _images(1), "aesthetics").mean.requires_grad


def test_per_query_dimensions_and_bad_dimension(tiny):
    out = tiny.score(PROMPTS, _images(3), ["alignment", "realism", "plausibility"])
    one = tiny.score(PROMPTS[1:2], _images(3)[1:2], "realism")
    torch.testing.assert_close(out.probs[1:2], one.probs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown dimension 'beauty'"):
        tiny.score(PROMPTS[:1], _images(1), "beauty")


def test_missing_image_is_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny.score(PROMPTS[:1], [str(tmp_path / "nope.png")], "realism")


def test_reasoning_mode_reads_the_score_after_the_marker(tiny):
    tok = tiny.tokenizer
    trace = tok.encode("top left red circle: yes.\nextra: none.\nScore: 7", add_special_tokens=False)
    i = tiny.find_score_index(trace)
    assert tok.decode(trace[i:i + 1]) == "7" and tiny.parsed_score(trace) == 4.0
    # a digit elsewhere is not a score; only the one after the last marker counts
    two = tok.encode("3 objects. Score: 2\nno, Score: 9", add_special_tokens=False)
    assert tiny.parsed_score(two) == 5.0
    assert tiny.find_score_index(tok.encode("2 circles, no score", add_special_tokens=False)) == -1
    # teacher-forced distribution at the score token equals the full logits one position earlier
    out = tiny.score_with_reasoning(PROMPTS[:2], _images(2), ["alignment"] * 2, completions=[trace, trace[:5]])
    assert out.valid.tolist() == [True, False]
    batch = tiny.encode(PROMPTS[:2], _images(2), ["alignment"] * 2, "reasoning", completions=[trace, trace[:5]])
    with torch.no_grad():
        full = tiny.vlm(**tiny._model_inputs(batch)).logits
    ref = full[0, batch["prompt_len"] + i - 1, tiny.bin_ids].float().softmax(-1)
    torch.testing.assert_close(out.probs[0], ref, rtol=1e-4, atol=1e-5)


def test_generation_never_emits_image_placeholders(tiny):
    # make <|image_pad|> the model's favourite token: generate must still not produce it
    head = tiny.vlm.get_output_embeddings()
    saved = head.weight.data.clone()
    try:
        with torch.no_grad():
            head.weight.data[tiny.image_token_id] = 10 * head.weight.data.abs().max()
        batch = tiny.encode(PROMPTS[:2], _images(2), "realism", "reasoning")
        comps = tiny.generate(batch, max_new_tokens=6, temperature=0.0)
        assert all(t not in tiny.vision_token_ids for c in comps for t in c)
    finally:
        head.weight.data.copy_(saved)
    with pytest.raises(ValueError, match="image placeholder"):
        tiny.encode(PROMPTS[:1], _images(1), "realism", "reasoning", completions=[[tiny.image_token_id]])


def test_generated_reasoning_is_scored(tiny):
    torch.manual_seed(0)
    out = tiny.score(PROMPTS[:2], _images(2), "realism", mode="reasoning", max_new_tokens=8, temperature=1.0)
    assert len(out.traces) == 2 and out.valid.dtype == torch.bool
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2))


def test_save_load_round_trip(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    tiny.save(path, step=7, args={"lr": 0.1})
    assert not list(tmp_path.glob("*.tmp-*")), "the atomic write left its temp file"
    rng = torch.get_rng_state()
    loaded = ScoreModel.load(path, like=tiny)
    assert torch.equal(rng, torch.get_rng_state()), "loading moved the global RNG: a run's noise would depend on what it loads"
    assert json.loads(loaded.metadata["step"]) == 7 and json.loads(loaded.metadata["args"]) == {"lr": 0.1}
    assert loaded.metadata["prompt_version"] == "zr-rubric-v3"
    a = tiny.score(PROMPTS, _images(3), "realism").probs
    b = loaded.score(PROMPTS, _images(3), "realism").probs
    assert torch.equal(a, b)
    # the tokenizer and processor came from the file, not from code
    text = "top left red circle: yes.\nScore: 7"
    assert loaded.tokenizer.encode(text) == tiny.tokenizer.encode(text)
    assert loaded.image_processor.patch_size == 16 and loaded.image_processor.merge_size == 2


def test_a_checkpoint_keeps_the_prompts_it_was_trained_on(tiny, tmp_path):
    """A v1 checkpoint (image before text) loads as v1, scores with the image first and saves as v1; a
    version this code does not know is refused, naming it."""
    from model import read_checkpoint, write_checkpoint

    assert tiny.prompt_version == "zr-rubric-v3"
    path, old, bad = tmp_path / "m.safetensors", tmp_path / "old.safetensors", tmp_path / "bad.safetensors"
    tiny.save(path)
    meta, tensors = read_checkpoint(path)
    write_checkpoint(old, tensors, dict(meta, prompt_version="zr-rubric-v1"))
    v1 = ScoreModel.load(old)
    new_text, old_text = tiny.prompt_text("a red circle top left", "alignment", "direct"), \
        v1.prompt_text("a red circle top left", "alignment", "direct")
    assert new_text.index("Prompt:") < new_text.index("<|image_pad|>")
    assert old_text.index("<|image_pad|>") < old_text.index("Prompt:")
    assert sorted(old_text) == sorted(new_text)  # the same words, in another order
    v1.save(tmp_path / "again.safetensors")
    assert read_checkpoint(tmp_path / "again.safetensors")[0]["prompt_version"] == "zr-rubric-v1"
    write_checkpoint(bad, tensors, dict(meta, prompt_version="zr-rubric-v9"))
    with pytest.raises(ValueError, match="zr-rubric-v9"):
        ScoreModel.load(bad)


def test_prompt_v3_reasons_with_the_image_first_and_answers_with_the_text_first():
    """zr-rubric-v3: a trace or caption reads the image first (as v1), a one-token answer gets the text first (as v2)."""
    from model import rubric_messages

    def order(version, mode):
        return [part["type"] for part in rubric_messages("a red circle top left", "alignment", mode, version)[0]["content"]]

    assert order("zr-rubric-v3", "reasoning") == order("zr-rubric-v1", "reasoning") == ["image", "text"]
    assert order("zr-rubric-v3", "caption") == ["image", "text"]
    assert order("zr-rubric-v3", "direct") == order("zr-rubric-v2", "direct") == ["text", "image"]
    assert order("zr-rubric-v3", "rewarddance") == ["text", "image"]
    assert order("zr-rubric-v2", "reasoning") == ["text", "image"] and order("zr-rubric-v1", "direct") == ["image", "text"]


def test_load_refuses_other_models(tiny, tmp_path):
    other = tiny_world.tiny_score_model(seed=0, hidden=128)
    path = tmp_path / "big.safetensors"
    other.save(path)
    with pytest.raises(ValueError, match="another config"):
        ScoreModel.load(path, like=tiny)
    meta, tensors = read_checkpoint(path)
    write_checkpoint(tmp_path / "bins.safetensors", tensors, {**meta, "bins": json.dumps([1, 2, 3, 4, 5])})
    with pytest.raises(ValueError, match="bins"):
        ScoreModel.load(tmp_path / "bins.safetensors")
    write_checkpoint(tmp_path / "foreign.safetensors", {"w": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a Z-Reward score-model checkpoint"):
        ScoreModel.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        ScoreModel.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_vl"])
def test_from_pretrained_local_folder(tiny, tmp_path, arch):
    tok = build_tiny_tokenizer()
    vlm = tiny.vlm if arch == "qwen3_5" else qwen3_vl(tok)
    vlm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tiny_image_processor().save_pretrained(tmp_path)
    loaded = ScoreModel.from_pretrained(tmp_path)
    assert type(loaded.vlm).__name__ == type(vlm).__name__
    direct = ScoreModel(vlm, tok, tiny_image_processor())
    a = direct.score(PROMPTS, _images(3), "plausibility").probs
    b = loaded.score(PROMPTS, _images(3), "plausibility").probs
    torch.testing.assert_close(a, b)
    # and its own checkpoint rebuilds it offline
    loaded.save(tmp_path / "x.safetensors")
    again = ScoreModel.load(tmp_path / "x.safetensors", like=loaded)
    torch.testing.assert_close(again.score(PROMPTS, _images(3), "plausibility").probs, a)


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (80, 100), (100, 80)])
def test_differentiable_preprocessing_matches_the_hf_processor(size):
    ip = tiny_image_processor()
    x8 = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x8]
    ref = ip(images=pil, return_tensors="pt")
    x = (x8.float() / 255).requires_grad_()
    pixel_values, grid = preprocess_differentiable(x, ip)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    err = (pixel_values - ref["pixel_values"]).abs().max().item()
    one_level = 1 / 255 / ip.image_std[0]
    if size[0] % 32 == 0 and size[1] % 32 == 0:
        assert err == 0.0  # no resize: exact
    else:
        assert err <= one_level * 1.0001  # Pillow's two-pass rounded resize, within one uint8 level
    (pixel_values * torch.randn_like(pixel_values)).sum().backward()
    assert (x.grad != 0).all(), "every pixel must receive gradient"


def test_tensor_images_score_like_pil_images(tiny):
    pil = _images(2)
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in pil])
    a = tiny.score(PROMPTS[:2], pil, "realism").probs
    b = tiny.score(PROMPTS[:2], x, "realism").probs
    torch.testing.assert_close(a, b)
