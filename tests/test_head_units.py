"""
Tests of the embeddings and the LM head as FSDP2 units of their own (issue 30), for models whose
embeddings are untied (Qwen3.5-9B and 27B; here the tiny base with its LM head untied, a copy of
its embeddings): FSDP2 gathers each only while it computes, so the root no longer holds them from
its forward to the end of its backward, and the score head and the fused log-prob reach the head
through the method common.wrap registers (ScoreModel.with_head). A tied model keeps them in the root.

    python -m pytest tests/test_head_units.py -q        # ~1 min on 2 cores
"""

import json
import os

import pytest
import torch

import common
from conftest import ROOT, assert_same_update, run_script, untied_tiny_base
from test_gdso import _run, needs_base

pytestmark = needs_base


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return untied_tiny_base(tmp_path_factory.mktemp("untied") / "untied.safetensors")


def test_only_untied_models_get_head_units(untied):
    tied = common.load_model(os.path.join(ROOT, "assets", "tiny_base.safetensors"))
    assert common._head_units(tied) == []
    model = common.load_model(untied)
    assert common._head_units(model) == [model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()]


def test_one_process_reads_the_head_as_before(untied, world):
    # no FSDP2: with_head passes the module's own weight, the outputs are those of the plain formulas
    model = common.load_model(untied)
    records = common.load_records(os.path.join(world, "test.jsonl"))[:3]
    batch = model.encode([r["prompt"] for r in records], common.open_images(records),
                         [r["dimension"] for r in records], "direct")
    idx = torch.full((3,), batch["prompt_len"] - 1)
    with torch.no_grad():
        out = model(batch, idx, score_targets=model.bin_ids[:3])
        hidden = model.vlm.model(**model._model_inputs(batch), use_cache=False).last_hidden_state[:, -1]
    weight = model.vlm.get_output_embeddings().weight
    torch.testing.assert_close(out["score_logits"], hidden @ weight[model.bin_ids].T)
    full = torch.log_softmax(hidden @ weight.T, -1)[torch.arange(3), model.bin_ids[:3]]
    torch.testing.assert_close(out["score_target_logprob"], full)


@pytest.mark.slow
def test_two_fsdp_ranks_with_head_units_match_one_process(untied, world, tmp_path):
    # gdso reads all three of the LM head's outputs: bin logits, L_pt's full-vocabulary log-prob and the
    # trace tokens' log-probs (sft reads the first only)
    args = ["--pairs", "4", "--group", "2", "--max-new-tokens", "40", "--beta", "0.05", "--micro-pairs", "1",
            "--ref-reset-every", "2"]
    args = ["--init", untied, "--data", world, "--steps", "3", "--eval-every", "0", "--eval-limit", "8", "--lr", "1e-3",
            "--warmup", "1", *args]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    _run([*args, "--out", one])
    _run([*args, "--fsdp", "--out", two], nproc=2)
    assert_same_update(one, two, untied, min_moved=1e-5)
    from safetensors.torch import load_file

    a, start = load_file(two), load_file(untied)
    assert (a["lm_head.weight"] - start["lm_head.weight"]).abs().mean() > 1e-5, "the LM head did not train"


PROBE = r'''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import common
rank, world, device = common.dist_init()
model = common.wrap(common.load_model(sys.argv[3], meta=True), device, fsdp=True)
inner = common.unwrap(model)
embed, head = inner.vlm.get_input_embeddings(), inner.vlm.get_output_embeddings()
def gathered(m):
    return m._get_fsdp_state()._fsdp_param_group.is_unsharded
seen = []
layers = common._units(inner)
decoder = [u for u in layers if ".visual." not in dict((id(m), n) for n, m in inner.named_modules())[id(u)]]
# during the decoder's backward: are the embeddings and the LM head gathered?
decoder[0].register_full_backward_hook(lambda *a: seen.append(["backward", gathered(embed), gathered(head)]))
heads = inner._heads
def recording_heads(*args):
    seen.append(["heads", gathered(embed), gathered(head)])
    return heads(*args)
inner._heads = recording_heads
records = common.load_records(sys.argv[2] + "/train.jsonl")[rank * 4:rank * 4 + 2]
batch = inner.encode([r["prompt"] for r in records], common.open_images(records), [r["dimension"] for r in records],
                     "reasoning", completions=[[5, 6, 7]] * 2)
targets = inner.completion_targets(batch, [[5, 6, 7]] * 2)
idx = torch.full((2,), batch["input_ids"].shape[1] - 2)
out = model(batch, idx, targets=targets, score_targets=inner.bin_ids[:2])
seen.append(["after forward", gathered(embed), gathered(head)])
(out["score_logits"].logsumexp(-1).sum() + out["token_logprobs"].sum() + out["score_target_logprob"].sum()).backward()
seen.append(["after backward", gathered(embed), gathered(head)])
grads = {n: type(p.grad).__name__ if p.grad is not None else None for n, p in
         (("embed", embed.weight), ("head", head.weight))}
with open(f"{sys.argv[4]}/probe-{rank}.json", "w") as f:
    json.dump({"seen": seen, "grads": grads, "units": [type(embed).__name__, type(head).__name__]}, f)
common.dist_cleanup()
common.exit_worker()  # as every script ends under torchrun (its docstring says why)
'''


@pytest.mark.slow
def test_the_head_units_are_gathered_only_while_they_compute(untied, world, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_script(script, [ROOT, world, untied, tmp_path], nproc=2)
    for rank in (0, 1):
        probe = json.loads((tmp_path / f"probe-{rank}.json").read_text())
        assert all(name.startswith("FSDP") for name in probe["units"])
        # the LM head gathered while the heads read it; then neither for the rest of the forward, nor the
        # decoder's backward, nor after it
        assert probe["seen"] == [["heads", False, True], ["after forward", False, False], ["backward", False, False],
                                 ["after backward", False, False]]
        assert probe["grads"] == {"embed": "DTensor", "head": "DTensor"}  # reduced into the shards
