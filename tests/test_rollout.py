"""
Rollouts sample from exactly the policy whose log-probs training recomputes: softmax(logits / T),
whatever the checkpoint's generation_config says (repetition penalty, top-k, top-p).

    python -m pytest tests/test_rollout.py -q
"""

import os

import pytest
import torch

import tiny_world
from model import ScoreModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
needs_base = pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import data
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=8, seed=0)
    return data.load_jsonl(str(out / "train.jsonl"))


def test_generate_samples_pi_at_temperature_whatever_the_generation_config(world):
    from PIL import Image

    m = tiny_world.tiny_score_model()
    norm = m.vlm.model.language_model.norm  # (1 + w) x RMSNorm: x5 sharpens the random model's next token
    with torch.no_grad():
        norm.weight.copy_((1 + norm.weight) * 5 - 1)
    r, T, n = world[0], 0.7, 1500
    image = Image.open(r["image_path"]).convert("RGB")
    batch = m.encode([r["prompt"]] * n, [image] * n, r["dimension"], "reasoning")
    with torch.no_grad():
        logits = m.vlm(**m._model_inputs(m.encode([r["prompt"]], [image], r["dimension"], "reasoning"))).logits[0, -1].float()
    full = torch.log_softmax(logits / T, -1)  # over the whole vocabulary, as training recomputes it
    logits[m.vision_token_ids] = -float("inf")  # generate() never emits an image placeholder
    p = torch.softmax(logits / T, -1)
    assert 0.2 < p.max() < 0.9, p.max()
    # a checkpoint's generation_config as a chat model ships it: none of this may reach the rollouts
    gc = m.vlm.generation_config
    gc.repetition_penalty, gc.top_k, gc.top_p, gc.min_p, gc.temperature = 3.0, 1, 0.5, 0.2, 0.3
    torch.manual_seed(0)
    nxt = torch.tensor([c[0] for c in m.generate(batch, max_new_tokens=1, temperature=T)])
    # compare on the 5 likeliest tokens and the rest as one bucket
    top = p.topk(5).indices
    bucket = lambda q: torch.cat([q[top], (1 - q[top].sum()).clamp_min(0)[None]])
    freq = bucket(torch.bincount(nxt, minlength=p.numel()).float() / n)
    tv = 0.5 * (freq - bucket(p)).abs().sum().item()
    bound = 0.5 * (bucket(p) / n).sqrt().sum().item()  # E[TV] from sampling noise alone is below this
    assert tv < 2 * bound, (tv, bound, freq, bucket(p))
    # the log-prob that training recomputes at the same temperature is the sampling distribution's
    comps = [[int(t)] for t in nxt[:8]]
    enc = m.encode([r["prompt"]] * 8, [image] * 8, r["dimension"], "reasoning", completions=comps)
    tgt = m.completion_targets(enc, comps)
    with torch.no_grad():
        lp = m(enc, torch.full((8,), enc["prompt_len"] - 1), targets=tgt, temperature=T)["token_logprobs"]
    torch.testing.assert_close(lp[:, enc["prompt_len"] - 1], full[nxt[:8]], atol=1e-4, rtol=0)


@needs_base
def test_greedy_ignores_the_repetition_penalty(world):
    from PIL import Image

    m = ScoreModel.load(BASE)
    r = world[0]
    batch = m.encode([r["prompt"]], [Image.open(r["image_path"]).convert("RGB")], r["dimension"], "reasoning")
    plain = m.generate(batch, max_new_tokens=24, temperature=0)
    m.vlm.generation_config.repetition_penalty = 50.0
    m.vlm.generation_config.no_repeat_ngram_size = 1
    assert m.generate(batch, max_new_tokens=24, temperature=0) == plain
