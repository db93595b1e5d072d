"""
Tests of sft.py: the SFT baseline learns (its loss falls on a fixed batch stream), writes a
checkpoint that eval.py reads in direct mode, a run stopped by --stop-after and resumed ends where
an uninterrupted one does, the base stage refuses a non-tiny model, and 2 torchrun ranks (DDP,
FSDP2) accumulating micro-batches match one process.

    python -m pytest tests/test_sft.py -q            # add -m slow for the torchrun runs
"""

import json
import os
import re

import pytest

from conftest import assert_same_update, run_script
import common
import tiny_world
from model import ScoreModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")


def _run(args, script="sft.py"):
    return run_script(script, args, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=16, seed=1)
    return str(out)


@pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
def test_sft_loss_falls_and_checkpoint_scores(world, tmp_path):
    out = str(tmp_path / "sft.safetensors")
    res = _run(["--init", BASE, "--data", world, "--out", out, "--steps", "40", "--batch-size", "16",
                "--micro-batch", "8", "--lr", "3e-3", "--warmup", "5", "--eval-every", "0", "--eval-limit", "32"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+)", res.stdout)]
    assert len(losses) >= 4
    # the direct score token starts untrained (the base never answered in direct mode)
    assert losses[-1] < 0.7 * losses[0], losses
    model = ScoreModel.load(out)
    assert model.metadata["mode"] == "direct"
    assert json.loads(model.metadata["args"])["steps"] == 40
    with open(out.removesuffix(".safetensors") + ".eval.json") as f:
        assert json.load(f)["table"]["overall"]["n"] == 32


@pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
def test_stop_after_then_resume_equals_an_uninterrupted_run(world, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    import sft

    args = ["--init", BASE, "--data", world, "--steps", "4", "--batch-size", "8", "--micro-batch", "4", "--lr", "3e-3",
            "--warmup", "1", "--eval-every", "0", "--eval-limit", "4", "--save-every", "2"]
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    sft.main([*args, "--out", full])
    # stopped after its step-3 checkpoint (off the --save-every schedule), before any evaluation
    sft.main([*args, "--out", part, "--stop-after", "3"])
    assert json.loads(ScoreModel.load(part).metadata["step"]) == 3 and not os.path.exists(part[:-12] + ".eval.json")
    capsys.readouterr()
    sft.main([*args, "--out", part, "--resume"])
    log = capsys.readouterr().out
    assert "resumed" in log and "at step 3" in log and "step 4 | test" in log, log
    a, b, base = load_file(full), load_file(part), load_file(BASE)
    assert any((a[k] != base[k]).any() for k in a), "the run did not train"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    oa = torch.load(os.path.join(common.newest_set(full), "train.pt"), weights_only=False)["optimizer"]["state"]
    ob = torch.load(os.path.join(common.newest_set(part), "train.pt"), weights_only=False)["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(v, ob[i][k]) for i in oa for k, v in oa[i].items())


def test_base_stage_refuses_a_real_model(world, tmp_path):
    model = tiny_world.tiny_score_model()
    model.source = "Qwen/Qwen3.5-9B"  # as if it came from from_pretrained
    model.save(tmp_path / "x.safetensors")
    res = _run(["--init", str(tmp_path / "x.safetensors"), "--data", world,
                "--out", str(tmp_path / "b.safetensors"), "--steps", "1"], script="tiny_base.py")
    assert res.returncode != 0 and "pretrains the embedded tiny model" in res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_match_one_process(world, tmp_path, fsdp):
    # 2 ranks x 2 micro-batches of 2 (forward and backward per micro-batch, gradients reduced on
    # the last one under DDP) against one process with 4 micro-batches of 2
    args = ["--init", BASE, "--data", world, "--steps", "2", "--batch-size", "8", "--micro-batch", "2",
            "--lr", "3e-3", "--warmup", "1", "--eval-every", "0", "--eval-limit", "4", "--save-every", "2"]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    res = _run(args + ["--out", one])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run_script("sft.py", args + ["--out", two] + (["--fsdp"] if fsdp else []), nproc=2)
    assert_same_update(one, two, BASE)


@pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
def test_base_direct_items_train_the_one_token_answer_on_the_traces_score(tmp_path):
    """tiny_base.py --direct-items 2 adds two one-token items per record whose target is the score
    line of the record's own trace (here the generic rubric's, not the label): a short run makes
    the direct answer more likely to be that score, and the header counts the added items."""
    import torch
    from PIL import Image

    from data import load_jsonl, parse_score, score_to_level
    from tiny_world import make_world

    data = tmp_path / "generic"
    make_world(str(data), n=8, seed=2, trace_rubric="generic")
    recs = load_jsonl(str(data / "train.jsonl"))
    target = torch.tensor([parse_score(r["trace"]) - 1 for r in recs])
    assert any(parse_score(r["trace"]) != score_to_level(r["score"]) for r in recs)  # not the labels' levels

    def direct_nll(path):
        model = ScoreModel.load(path)
        images = [Image.open(r["image_path"]).convert("RGB") for r in recs]
        with torch.no_grad():
            out = model.score([r["prompt"] for r in recs], images, [r["dimension"] for r in recs], "direct")
        return -out.probs.clamp_min(1e-12).log().gather(1, target[:, None]).mean().item()

    out = tmp_path / "base.safetensors"
    res = _run(["--direct-items", "2", "--init", BASE, "--data", str(data), "--out", str(out),
                "--steps", "20", "--lr", "3e-3", "--warmup", "1", "--batch-size", "16", "--micro-batch", "16",
                "--eval-every", "0", "--eval-limit", "4"], script="tiny_base.py")
    assert res.returncode == 0, res.stderr[-2000:]
    images = len({r["image_path"] for r in recs})
    assert f"| {images + 3 * len(recs)} items |" in res.stdout, res.stdout[:500]  # caption, trace, 2 x direct
    before, after = direct_nll(BASE), direct_nll(str(out))
    assert after < before - 0.5, (before, after)


def test_base_direct_items_per_dimension_and_direct_only(tmp_path):
    """--direct-items alignment=3 gives each alignment record three one-token items and no other record
    one; --direct-only drops the captions and traces (the bases' first run); a bad spec names the problem."""
    import argparse

    import tiny_base
    from data import load_jsonl
    from tiny_world import make_world

    make_world(str(tmp_path), n=4, seed=0, trace_rubric="generic")
    train = load_jsonl(str(tmp_path / "train.jsonl"))
    n_align = sum(r["dimension"] == "alignment" for r in train)
    n_images = len({r["image_path"] for r in train})

    def kinds(*argv):
        items = tiny_base.Base().items(tiny_base.get_args(list(argv)), train, "train.jsonl")
        return {k: sum(kind == k for kind, _, _ in items) for k in ("direct", "caption", "reasoning")}

    assert kinds("--direct-items", "alignment=3") == {"direct": 3 * n_align, "caption": n_images, "reasoning": len(train)}
    assert kinds("--direct-items", "2") == {"direct": 2 * len(train), "caption": n_images, "reasoning": len(train)}
    assert kinds("--direct-items") == {"direct": len(train), "caption": n_images, "reasoning": len(train)}
    assert kinds() == {"direct": 0, "caption": n_images, "reasoning": len(train)}
    assert kinds("--direct-only", "--direct-items", "alignment=1") == {"direct": n_align, "caption": 0, "reasoning": 0}
    with pytest.raises(SystemExit):
        kinds("--direct-only")  # nothing to train
    for bad in ("align=2", "alignment=-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            tiny_base.direct_counts(bad)
