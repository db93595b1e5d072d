"""
Tests of gdso.py's two memory moves around the rollout (issue 30): --offload (AdamW's state and
pi_ref wait in host memory while a phase does not use them: common.Offload) and
--layerwise-rollout (FSDP2 gathers one unit at a time while the policy generates:
common.rollout_mode(layerwise=True)).

Both change where bytes sit, never a number: a run with them equals a run without, bit for bit,
in one process and on 2 ranks under FSDP2 (gloo), evaluation included, and a run resumes across
turning them on or off.

    python -m pytest tests/test_rollout_memory.py -q            # ~1 min on 2 cores
"""

import json

import numpy as np
import pytest
import torch

import common
import gdso
from conftest import ROOT, run_script
from test_gdso import BASE, _run, needs_base

CPU = torch.device("cpu")


def _adamw_after_a_step(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    return model, opt


def test_offload_sends_state_away_and_brings_it_back_bit_exact():
    model, opt = _adamw_after_a_step()
    twin, twin_opt = _adamw_after_a_step()
    offload = common.Offload(CPU, adam=lambda: gdso.optimizer_tensors(opt))
    before = [t.clone() for t in gdso.optimizer_tensors(opt)]
    offload.keep()
    assert offload.bytes_away() == sum(t.numel() * t.element_size() for t in before)
    assert all(t.untyped_storage().nbytes() == 0 for t in gdso.optimizer_tensors(opt)), "nothing was freed"
    offload.keep()  # already away: a second call moves nothing
    offload.keep("adam")
    assert offload.bytes_away() == 0
    assert all(torch.equal(a, b) for a, b in zip(gdso.optimizer_tensors(opt), before))
    # the optimizer goes on from the same tensors, as the twin that never moved
    x = torch.randn(4, 6)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_offload_keeps_views_and_handles_storage_that_cannot_resize():
    # weights read from a file's memory (here numpy) live in a storage that cannot be resized: it is
    # replaced by one that can, under every tensor viewing it; a view of part of a storage moves all of it
    base = torch.from_numpy(np.arange(12, dtype=np.float32))
    assert not base.untyped_storage().resizable()
    p = torch.nn.Parameter(base)
    head, tail = torch.arange(10.0), None
    tail = head[6:]
    offload = common.Offload(CPU, frozen=lambda: [p], part=lambda: [tail], disabled=lambda: [])
    offload.keep("disabled")
    assert p.untyped_storage().nbytes() == 0 and head.untyped_storage().nbytes() == 0
    offload.keep("frozen", "part")
    assert torch.equal(p.detach(), torch.arange(12.0)) and torch.equal(head, torch.arange(10.0))
    assert torch.equal(tail, torch.arange(6.0, 10.0)) and p.requires_grad


def test_offload_disabled_does_nothing_and_names_are_checked():
    _, opt = _adamw_after_a_step()
    off = common.Offload(CPU, enabled=False, adam=lambda: gdso.optimizer_tensors(opt))
    off.keep()
    assert all(t.untyped_storage().nbytes() for t in gdso.optimizer_tensors(opt))
    with pytest.raises(AssertionError, match="no offload group"):
        common.Offload(CPU, adam=lambda: []).keep("ref")


def test_layerwise_rollout_needs_fsdp(capsys):
    with pytest.raises(SystemExit) as e:
        gdso.get_args(["--layerwise-rollout"])
    assert e.value.code == 2 and "--layerwise-rollout needs --fsdp" in capsys.readouterr().err


# 2 steps, pi_ref reset at step 1 (FSDP2 left the reference's root gathered after it scored: the copy
# failed on DTensor against tensor until common.reshard), evaluations at steps 1 and 2 (reasoning mode)
RUN = ["--init", BASE, "--pairs", "4", "--group", "2", "--max-new-tokens", "40", "--eval-every", "1", "--eval-limit", "8",
       "--lr", "1e-3", "--warmup", "1", "--steps", "2", "--save-every", "2", "--beta", "0.05", "--ref-reset-every", "1",
       "--micro-pairs", "1"]


def _same_weights(one, two):
    from safetensors.torch import load_file

    a, b = load_file(one), load_file(two)
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def _eval_lines(out):
    return [line for line in out.splitlines() if line.split()[:1] in (["overall"], ["alignment"], ["aesthetics"])]


@needs_base
def test_offload_gives_the_same_run_in_one_process(world, tmp_path):
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    a = _run([*RUN, "--data", world, "--out", one])
    b = _run([*RUN, "--data", world, "--out", two, "--offload"])
    assert _same_weights(one, two) == []
    assert _eval_lines(a) and _eval_lines(a) == _eval_lines(b)


@needs_base
@pytest.mark.slow
def test_offload_and_layerwise_rollout_give_the_same_run_on_two_fsdp_ranks(world, tmp_path):
    plain, moved = str(tmp_path / "plain.safetensors"), str(tmp_path / "moved.safetensors")
    a = _run([*RUN, "--data", world, "--out", plain, "--fsdp"], nproc=2)
    b = _run([*RUN, "--data", world, "--out", moved, "--fsdp", "--offload", "--layerwise-rollout"], nproc=2)
    assert _same_weights(plain, moved) == []
    assert _eval_lines(a) and _eval_lines(a) == _eval_lines(b)
    # a resume across the flags: a step with them, the second without, equals the uninterrupted run
    part = str(tmp_path / "part.safetensors")
    _run([*RUN, "--data", world, "--out", part, "--fsdp", "--offload", "--layerwise-rollout", "--stop-after", "1"],
         nproc=2)
    out = _run([*RUN, "--data", world, "--out", part, "--fsdp", "--resume"], nproc=2)
    assert "--offload True -> False" in out and "--layerwise-rollout True -> False" in out
    assert _same_weights(plain, part) == []


PROBE = r'''
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import common
rank, world, device = common.dist_init()
records = common.load_records(sys.argv[2] + "/train.jsonl")[rank * 5:rank * 5 + 4]
model = common.wrap(common.load_model(sys.argv[3], meta=True), device, fsdp=True)
units = [m for m in model.modules() if type(m).__name__.startswith("FSDP") and m is not model]
most = []
def count(*_):
    most.append(sum(u._get_fsdp_state()._fsdp_param_group.is_unsharded for u in units))
for u in units:
    u.register_forward_pre_hook(count)
out = {}
for layerwise in (False, True):
    most.clear()
    with common.rollout_mode(model, layerwise=layerwise) as m, common.seeded(device, 0, rank):
        batch = m.encode([r["prompt"] for r in records], common.open_images(records),
                         [r["dimension"] for r in records], "reasoning")
        out[str(layerwise)] = {"tokens": m.generate(batch, 48, 1.0), "most": max(most), "calls": len(most)}
out["units"] = len(units)
with open(f"{sys.argv[4]}/probe-{rank}.json", "w") as f:
    json.dump(out, f)
common.dist_cleanup()
common.exit_worker()  # as every script ends under torchrun (its docstring says why)
'''


@needs_base
@pytest.mark.slow
def test_layerwise_rollout_gathers_one_unit_at_a_time_and_samples_the_same_tokens(world, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_script(script, [ROOT, world, BASE, tmp_path], nproc=2)
    probes = [json.loads((tmp_path / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    for p in probes:
        fast, layerwise = p["False"], p["True"]
        assert fast["tokens"] == layerwise["tokens"]
        assert fast["most"] == p["units"], "the fast path gathers every unit for the whole rollout"
        # a unit's pre-forward hook runs before FSDP2 gathers it: the one before it may still be
        # gathered, none other
        assert layerwise["most"] <= 1, layerwise["most"]
    # the ranks' traces end at different lengths, yet both ran as many forwards: the rank done first
    # kept stepping with the other (synced_gpus), or the collectives would have hung
    fast_calls = [p["False"]["calls"] for p in probes]
    assert fast_calls[0] != fast_calls[1], "the probe's ranks finished together: nothing shows the sync"
    assert probes[0]["True"]["calls"] == probes[1]["True"]["calls"] == max(fast_calls)


def test_balanced_shard_gives_every_rank_as_many_records_of_each_dimension():
    from eval import balanced_shard

    dims = ["alignment"] * 5 + ["realism"] * 3 + ["aesthetics"] * 2 + ["plausibility"]
    records = [{"dimension": d} for d in dims]
    shards = [balanced_shard(records, rank, 3) for rank in range(3)]
    own = [idx[:real] for idx, real in shards]
    assert sorted(i for o in own for i in o) == list(range(len(records)))  # each record scored once
    for idx, _ in shards:  # per dimension: ceil(5/3) = 2, 1, 1, 1 records on every rank
        counts = {d: sum(records[i]["dimension"] == d for i in idx) for d in set(dims)}
        assert counts == {"alignment": 2, "realism": 1, "aesthetics": 1, "plausibility": 1}
