"""
Tests of sft.py --stage rewarddance (the paper's RewardDance baseline: the score token, then a
post-hoc rationale): with --rationale-weight 0 its loss and gradient are the SFT stage's on the
same batch; the rationale's tokens get the hand-computed gradient -w / (rationale tokens in the
step) and the prompt and score positions none; the answer is the label's bin token then the
world's trace without its "Score:" line (or a record's own `rationale`), and a record without one
stops the run; scoring reads the first answer token and never generates, in training's eval and
in eval.py --ckpt; a resumed run ends bit for bit where an uninterrupted one does; 2 torchrun
ranks match one process.

    python -m pytest tests/test_rewarddance.py -q            # add -m slow for the torchrun runs
"""

import json
import os
import re
import runpy
import sys

import pytest
import torch

import common
from conftest import assert_same_update, run_script
import model as model_lib
from data import SCORE_MARKER, score_to_level
from model import BIN_TOKENS, ScoreModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
pytestmark = pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
FORWARD, CLIP = ScoreModel.forward, torch.nn.utils.clip_grad_norm_  # the originals, which Capture wraps
FAST = ["--init", BASE, "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3", "--warmup", "1",
        "--eval-every", "0", "--eval-limit", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=8, seed=0)
    return str(out)


def _sft(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")


def _records(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def _expected_answer(r):
    """What the answer must be: the label's bin digit, the trace without its score line, end of turn."""
    rationale = r["rationale"] if "rationale" in r else r["trace"].rsplit("\n", 1)[0]
    return f"{BIN_TOKENS[score_to_level(r['score']) - 1]}\n{rationale}<|im_end|>"


class Capture:
    """Records every training forward (grad on): its batch, targets and outputs, with the outputs'
    gradients retained; and the gradients of all parameters where the script clips them."""

    def __init__(self, monkeypatch):
        self.calls, self.grads = [], []
        forward, clip = FORWARD, CLIP

        def fwd(mod, batch, score_index, targets=None, **kwargs):
            out = forward(mod, batch, score_index, targets=targets, **kwargs)
            if torch.is_grad_enabled():
                for v in out.values():
                    v.retain_grad()
                self.calls.append({"batch": batch, "idx": score_index, "targets": targets, "out": out})
            return out

        def clip_grads(params, *args, **kwargs):
            params = list(params)
            self.grads.append([p.grad.clone() for p in params if p.grad is not None])
            return clip(params, *args, **kwargs)

        monkeypatch.setattr(ScoreModel, "forward", fwd)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grads)


def test_weight_zero_is_the_sft_loss_and_gradient(world, tmp_path, monkeypatch, capsys):
    # the same prompt for both (the mode's instruction is the only other difference): the score is
    # then read at the same position after the same tokens, and the rationale appended after it
    # must change nothing when its weight is 0
    monkeypatch.setitem(model_lib.INSTRUCTIONS, "rewarddance", model_lib.INSTRUCTIONS["direct"])
    runs = {}
    for stage, extra in (("sft", []), ("rewarddance", ["--rationale-weight", "0"])):
        cap = Capture(monkeypatch)
        _sft(monkeypatch, [*FAST, "--stage", stage, "--data", world, "--out", str(tmp_path / f"{stage}.safetensors"), *extra])
        loss = float(re.search(r"step     1 \| loss ([0-9.]+)", capsys.readouterr().out).group(1))
        runs[stage] = (loss, cap)
    (loss_sft, sft), (loss_rd, rd) = runs["sft"], runs["rewarddance"]
    assert rd.calls[0]["targets"] is not None and (rd.calls[0]["targets"] != -100).any(), "no rationale was trained"
    assert loss_rd == pytest.approx(loss_sft, rel=1e-4)
    assert len(sft.grads[0]) == len(rd.grads[0]) > 0
    for g_sft, g_rd in zip(sft.grads[0], rd.grads[0]):
        # the longer sequence changes the order of fp32 sums (the causal conv's weight gradient sums
        # over every position), so an element equals up to rounding at the tensor's own scale
        torch.testing.assert_close(g_rd, g_sft, rtol=1e-4, atol=1e-4 * g_sft.abs().max().item())


def test_rationale_tokens_get_gradient_prompt_does_not(world, tmp_path, monkeypatch, capsys):
    w = 0.5
    cap = Capture(monkeypatch)
    out = str(tmp_path / "rd.safetensors")
    _sft(monkeypatch, [*FAST, "--stage", "rewarddance", "--data", world, "--out", out, "--rationale-weight", str(w)])
    log = capsys.readouterr().out
    assert len(cap.calls) == 2  # two micro-batches of 2
    tok = ScoreModel.load(BASE).tokenizer
    expected = {_expected_answer(r) for r in _records(os.path.join(world, "train.jsonl"))}
    n_tokens = sum(int((c["targets"] != -100).sum()) for c in cap.calls)
    for c in cap.calls:
        batch, targets, out_ = c["batch"], c["targets"], c["out"]
        Lp = batch["prompt_len"]
        assert (c["idx"] == Lp - 1).all()  # the score is read before the first answer token, as SFT does
        for b in range(targets.shape[0]):
            n = int(batch["attention_mask"][b, Lp:].sum())
            answer = batch["input_ids"][b, Lp:Lp + n].tolist()
            # the answer: the label's bin token, the rationale, the end of the turn
            assert tok.decode(answer, skip_special_tokens=False) in expected
            # next-token targets on the tokens after the score token only (Lp - 1 predicts the score)
            assert (targets[b, :Lp] == -100).all()
            assert targets[b, Lp:Lp + n - 1].tolist() == answer[1:]
            assert (targets[b, Lp + n - 1:] == -100).all()
        # d loss / d log pi = -w / (the step's rationale tokens) on them; prompt, score and padding
        # positions have no log-prob in the loss at all (constant 0: their targets are -100)
        lp, keep = out_["token_logprobs"], targets != -100
        torch.testing.assert_close(lp.grad[keep], torch.full_like(lp.grad[keep], -w / n_tokens))
        assert (lp[~keep] == 0).all() and (lp[keep] < 0).all()
        # the score term is SFT's CE (Eq. 8) averaged over the step's 4 samples: (q - onehot) / 4
        logits = out_["score_logits"]
        level = [BIN_TOKENS.index(tok.decode([i])) for i in batch["input_ids"][:, Lp].tolist()]
        want = (torch.softmax(logits.detach(), -1) - torch.eye(9)[level]) / 4
        torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-7)
    terms = re.search(r"loss ([0-9.]+) \| score_ce ([0-9.]+) \| rationale ([0-9.]+)", log)
    assert float(terms[1]) == pytest.approx(float(terms[2]) + w * float(terms[3]), abs=2e-4)
    assert float(terms[3]) == pytest.approx(-sum(float(c["out"]["token_logprobs"].detach().sum()) for c in cap.calls) / n_tokens,
                                            rel=1e-4)
    # the checkpoint scores in its own mode: eval.py --ckpt reproduces the run's own evaluation
    import eval as evaluation

    assert ScoreModel.load(out).metadata["mode"] == "rewarddance"
    j = str(tmp_path / "ev.json")
    evaluation.main(["--ckpt", out, "--data", world, "--limit", "4", "--json", j, "--device", "cpu"])
    assert "(rewarddance mode)" in capsys.readouterr().out
    with open(j) as f, open(out.removesuffix(".safetensors") + ".eval.json") as g:
        got, ran = json.load(f)["table"]["overall"], json.load(g)["table"]["overall"]
    assert got["tokens"] == 1 and got["n"] == 4
    for k in ("plcc", "srcc", "hpa"):
        assert got[k] == pytest.approx(ran[k], abs=1e-6, nan_ok=True)


def test_scoring_reads_the_first_answer_token(world, monkeypatch):
    import eval as evaluation
    from PIL import Image

    model = ScoreModel.load(BASE)
    recs = _records(os.path.join(world, "test.jsonl"))[:4]
    prompts, dims = [r["prompt"] for r in recs], [r["dimension"] for r in recs]
    images = [Image.open(os.path.join(world, r["image"])).convert("RGB") for r in recs]

    def no_generation(*a, **k):
        raise AssertionError("rewarddance scoring must not generate")

    monkeypatch.setattr(ScoreModel, "generate", no_generation)
    with torch.no_grad():
        out = model.score(prompts, images, dims, mode="rewarddance")
        assert out.traces is None
        # the same distribution as read, teacher-forced, before the first token of a full answer
        comps = [model.tokenizer.encode(_expected_answer(r), add_special_tokens=False) for r in recs]
        batch = model.encode(prompts, images, dims, "rewarddance", completions=comps)
        assert "then explain why." in model.tokenizer.decode(batch["input_ids"][0])
        idx = torch.full((4,), batch["prompt_len"] - 1)
        q = torch.softmax(model(batch, idx)["score_logits"], -1)
        torch.testing.assert_close(out.probs, q, rtol=1e-4, atol=1e-5)
        # its own prompt, not the direct one
        direct = model.score(prompts, images, dims, mode="direct")
        assert not torch.allclose(direct.probs, out.probs)
    for r in recs:
        r["image_path"] = os.path.join(world, r["image"])
    pred = evaluation.predict(model, recs, "rewarddance", progress=False)
    assert (pred["n_tokens"] == 1).all()


def test_records_rationale_is_the_answer_and_a_record_without_one_stops(world, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "own"
    folder.mkdir()
    os.symlink(os.path.join(world, "images"), folder / "images")
    recs = _records(os.path.join(world, "train.jsonl"))
    for r in recs:  # not the tiny world: no scene, no trace, a rationale of the record's own
        del r["scene"], r["trace"]
        r["rationale"] = f"looked at {r['dimension']}."
    for split, rs in (("train", recs), ("test", _records(os.path.join(world, "test.jsonl")))):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    cap = Capture(monkeypatch)
    _sft(monkeypatch, [*FAST, "--stage", "rewarddance", "--data", str(folder), "--out", str(tmp_path / "a.safetensors")])
    tok = ScoreModel.load(BASE).tokenizer
    batch = cap.calls[0]["batch"]
    answer = tok.decode(batch["input_ids"][0, batch["prompt_len"]:], skip_special_tokens=False)
    assert answer.split("<|im_end|>")[0] in {_expected_answer(r).removesuffix("<|im_end|>") for r in recs}
    assert SCORE_MARKER not in answer
    # one record without a rationale (and no scene to make one from): exit 2 naming it
    del recs[5]["rationale"]
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _sft(monkeypatch, [*FAST, "--stage", "rewarddance", "--data", str(folder), "--out", str(tmp_path / "b.safetensors")])
    assert e.value.code == 2
    assert repr(recs[5]["id"]) in capsys.readouterr().err


def test_resume_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    args = [*FAST, "--stage", "rewarddance", "--data", world, "--steps", "4", "--save-every", "2", "--eval-limit", "2"]
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    _sft(monkeypatch, [*args, "--out", full])
    # the same run, killed right after its step-2 checkpoint, then resumed
    real_save = common.save_checkpoint

    def save_then_crash(path, model, optimizer=None, step=0, *a, **kw):
        real_save(path, model, optimizer, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _sft(monkeypatch, [*args, "--out", part])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    _sft(monkeypatch, [*args, "--out", part, "--resume"])
    a, b, base = load_file(full), load_file(part), load_file(BASE)
    assert any((a[k] != base[k]).any() for k in a), "the run did not train"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_match_one_process(world, tmp_path, fsdp):
    # 2 ranks x 2 micro-batches of 2 against one process with 4 micro-batches of 2: the rationale's
    # token count that normalizes its loss is the step's global one on every rank
    args = ["--stage", "rewarddance", "--init", BASE, "--data", world, "--steps", "2", "--batch-size", "8",
            "--micro-batch", "2", "--lr", "3e-3", "--warmup", "1", "--eval-every", "0", "--eval-limit", "4",
            "--save-every", "2"]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    run_script("sft.py", [*args, "--out", one])
    run_script("sft.py", [*args, "--out", two, *(["--fsdp"] if fsdp else [])], nproc=2)
    assert_same_update(one, two, BASE)
