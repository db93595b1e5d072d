"""
Tests for the metrics in eval.py against small cases worked out by hand in the comments.

Run: python -m pytest tests/test_eval.py -q   (under a second, CPU only)
"""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_world  # noqa: E402
from data import gsb, hpa, plcc, rankdata, score_metrics, srcc  # noqa: E402

def test_hpa_two_groups():
    # group p1: s = [1, 2, 3], mu = [.1, .3, .2]
    #   (1,2): human -1, model -.2 agree; (1,3): -2 vs -.1 agree; (2,3): -1 vs +.1 disagree -> 2 of 3
    # group p2: s = [2, 2, 4], mu = [.5, .9, .5]
    #   (2,2) label tie: no pair; (2,4): mu tie -> a miss (Eq. 17 counts agreement); (2,4) with
    #   mu .9 vs .5: disagree -> 0 of 2
    # HPA = 2 / 5; the groups are interleaved to check the grouping
    s = [1, 2, 2, 3, 2, 4]
    mu = [.1, .5, .3, .2, .9, .5]
    ids = ["p1", "p2", "p1", "p1", "p2", "p2"]
    assert hpa(mu, s, ids) == pytest.approx(0.4)
    # only p1: 2/3
    assert hpa([.1, .3, .2], [1, 2, 3], ["p1"] * 3) == pytest.approx(2 / 3)
    # pairs never cross groups: p1 and p2 alone would be 1.0 each, across them it would be 0
    assert hpa([1, 2, 3, 4], [1, 2, 3, 4], ["a", "a", "b", "b"]) == 1.0

def test_margin_hpa():
    # s = [3.0, 3.5, 4.5], mu = [1, 0, 2]
    #   (3.0, 3.5): human gap .5 (kept by HPA, dropped by margin .5), model says +1: disagree
    #   (3.0, 4.5): -1.5 vs -1 agree; (3.5, 4.5): -1 vs -2 agree
    # HPA = 2/3, margin HPA = 2/2 = 1
    s, mu, ids = [3.0, 3.5, 4.5], [1, 0, 2], ["p"] * 3
    assert hpa(mu, s, ids) == pytest.approx(2 / 3)
    assert hpa(mu, s, ids, margin=0.5) == 1.0
    # 1.1 - 0.6 = 0.5000000000000001 in floats: still a gap of exactly 0.5, so no pair
    assert math.isnan(hpa([1, 0], [1.1, 0.6], ["p", "p"], margin=0.5))

def test_hpa_ties_and_empty():
    # a constant predictor ties every pair, and a tie agrees with no human order: 0
    assert hpa([3.0] * 4, [1, 2, 3, 4], ["g"] * 4) == 0.0
    # one tie among three pairs: 2 of 3, not 2.5 of 3
    assert hpa([1.0, 1.0, 2.0], [1, 2, 3], ["g"] * 3) == pytest.approx(2 / 3)
    # no pairs: all labels equal, or every group a singleton, or nothing at all
    assert math.isnan(hpa([1, 2, 3], [2, 2, 2], ["g"] * 3))
    assert math.isnan(hpa([1, 2], [1, 5], ["a", "b"]))
    assert math.isnan(hpa([], [], []))
    # group keys may be tuples (prompt, dimension)
    assert hpa([1, 2, 5], [1, 2, 5], [("p", "realism"), ("p", "realism"), ("p", "alignment")]) == 1.0

def test_plcc():
    # x = [1, 2, 3], y = [1, 3, 2]: centered [-1, 0, 1] and [-1, 1, 0]
    # sum of products 1, sums of squares 2 and 2 -> 1 / 2
    assert plcc([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert plcc([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert plcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(plcc([1, 1, 1], [1, 2, 3]))  # constant side: undefined
    assert isinstance(plcc([1, 2], [1, 2]), float)

def test_srcc_average_ranks():
    assert list(rankdata([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]  # the 3s share ranks 3 and 4
    # x = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4], centered [-1.5, 0, 0, 1.5], sum of squares 4.5
    # y = [10, 20, 30, 40] -> ranks [1, 2, 3, 4], centered [-1.5, -.5, .5, 1.5], sum of squares 5
    # sum of products 2.25 + 2.25 = 4.5 -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert srcc([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(math.sqrt(0.9))
    assert srcc([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert plcc([1, 2, 3, 4], [1, 8, 27, 64]) < 1.0

def test_gsb():
    assert gsb(50, 30, 20) == pytest.approx(0.3)  # (50 - 20) / 100
    assert gsb(1, 0, 3) == pytest.approx(-0.5)  # (1 - 3) / 4
    assert gsb(0, 7, 0) == 0.0
    assert math.isnan(gsb(0, 0, 0))

def test_score_metrics():
    m = score_metrics([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.5], ["g"] * 4)
    assert m["plcc"] > 0.99 and m["srcc"] == pytest.approx(1.0)
    assert m["hpa"] == 1.0 and m["margin_hpa"] == 1.0 and m["n"] == 4

def _write_run(tmp_path, name, hpa_value):
    import json
    p = tmp_path / name
    p.write_text(json.dumps({"method": "x", "table": {"overall": {"hpa": hpa_value}}}))
    return str(p)

def test_runs_are_named_by_file_and_paired_by_seed(tmp_path):
    from eval import paired_differences, run_name, summarize
    assert run_name("runs/sft-0.eval.json") == ("sft", 0)
    assert run_name("student-sft-12.curve.jsonl") == ("student-sft", 12)
    assert run_name("zero-shot.eval.json") == ("zero-shot", None)
    with pytest.raises(ValueError, match="METHOD"):
        run_name("sft.safetensors")
    # gdso - grpo per seed: +.10, +.20, +.30 -> mean .20, sd .10, t(2) = 4.303: half width .248
    paths = [_write_run(tmp_path, f"gdso-{s}.eval.json", .5 + d) for s, d in enumerate((.1, .2, .3))]
    paths += [_write_run(tmp_path, f"grpo-{s}.eval.json", .5) for s in range(3)]
    paths += [_write_run(tmp_path, "grpo-7.eval.json", .9)]  # a seed gdso lacks: not paired
    line = [l for l in paired_differences(paths).splitlines() if l.startswith("gdso - grpo")][0]
    assert "+0.200" in line and "[-0.048, +0.448]" in line and line.split()[3] == "3"
    table = summarize([p for p in paths if "grpo-7" not in p], columns=("hpa",))
    assert [l.split()[:3] for l in table.splitlines()[1:]] == [["grpo", "3", "0.500"], ["gdso", "3", "0.700"]]


def test_rollout_stats_count_what_a_group_holds(tmp_path):
    # greedy "sampling" draws the greedy trace G times: one distinct trace, none unlike it, no spread;
    # sampling at T = 1 from the untrained model draws different ones (its traces are noise)
    import torch

    import common
    from eval import rollout_stats, spread_subset
    from tiny_world import make_world

    make_world(str(tmp_path), n=4, seed=0)
    records = spread_subset(common.load_records(str(tmp_path / "test.jsonl")), 4)
    assert len(records) == 4 and spread_subset(records, 0) == records
    model = tiny_world.tiny_score_model().eval()
    same = rollout_stats(model, records, group=3, temperature=0.0, max_new_tokens=6, progress=False)
    assert same["distinct"] == 1.0 and same["unlike_greedy"] == 0.0 and same["mu_std"] < 1e-6
    assert len(same["greedy"]) == 4
    torch.manual_seed(0)
    hot = rollout_stats(model, records, group=3, temperature=1.0, max_new_tokens=6, progress=False)
    assert 1.0 < hot["distinct"] <= 3.0 and 0.0 < hot["unlike_greedy"] <= 1.0
    assert hot["greedy"] == same["greedy"]


def test_scoring_and_rollouts_from_the_command_line_in_bf16(tmp_path, capsys):
    # the two model-loading commands end to end on a saved tiny checkpoint, loaded in bf16
    import json

    import eval as ev
    from tiny_world import make_world

    make_world(str(tmp_path / "w"), n=4, seed=0)
    tiny_world.tiny_score_model().save(str(tmp_path / "m.safetensors"))
    ev.main(["--ckpt", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "w"), "--bf16", "--limit", "8",
             "--json", str(tmp_path / "t.json")])
    assert set(json.load(open(tmp_path / "t.json"))["table"]) >= {"overall"}
    ev.main(["rollouts", "--ckpt", str(tmp_path / "m.safetensors"), "--against", str(tmp_path / "m.safetensors"),
             "--data", str(tmp_path / "w"), "--limit", "4", "--group", "2", "--max-new-tokens", "6", "--bf16"])
    out = capsys.readouterr().out
    assert "on 4 records" in out and "distinct traces per group" in out
    assert "greedy traces unlike" in out and ": 0.00 of 4 records" in out  # a model against itself
