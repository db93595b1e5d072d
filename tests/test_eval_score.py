"""
Tests of `eval.py score` (images from the command line or a JSONL) and `eval.py pairs` (accuracy on
a pairwise preference benchmark), on the shipped tiny checkpoints, a tiny Hugging Face folder and a
pair file built from the tiny world.

    python -m pytest tests/test_eval_score.py -q          (about half a minute on 2 CPU cores)
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import tiny_world
from model import BINS, ScoreModel
from rating_sets.pairs import aggregate_mu, pair_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = os.path.join(ROOT, "assets", "tiny_student.safetensors")
TEACHER = os.path.join(ROOT, "assets", "tiny_teacher.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    tiny_world.make_world(str(out), n=6, seed=0)
    return out


def _records(world):
    return [json.loads(line) for line in open(world / "test.jsonl")]


def _score(argv, tmp_path):
    out = tmp_path / "scores.json"
    evaluation.main(["score", *argv, "--json", str(out)])
    return json.loads(out.read_text())


def test_score_prints_mu_sigma_and_the_distribution_of_each_image_and_dimension(world, tmp_path, capsys):
    recs = _records(world)[:2]
    paths = [str(world / r["image"]) for r in recs]
    got = _score(["--ckpt", STUDENT, "--prompt", recs[0]["prompt"], *paths], tmp_path)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " | mu " in ln]
    assert len(lines) == len(got["scores"]) == 2 * 4  # two images x the four dimensions
    assert got["mode"] == "direct" and got["bins"] == list(BINS)
    model = ScoreModel.load(STUDENT)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        want = model.score([recs[0]["prompt"]] * 2, images, "realism")
    rows = [r for r in got["scores"] if r["dimension"] == "realism"]
    for i, r in enumerate(rows):
        q = np.array(r["probs"])
        assert abs(q.sum() - 1) < 1e-5 and abs((q * np.array(BINS)).sum() - r["mu"]) < 1e-5
        assert abs(r["sigma"] - np.sqrt((q * (np.array(BINS) - r["mu"]) ** 2).sum())) < 1e-4
        assert abs(r["mu"] - float(want.mean[i])) < 1e-5  # the same numbers as the Python API


def test_score_reads_a_jsonl_and_scores_in_reasoning_mode(world, tmp_path):
    recs = _records(world)[:2]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": r["prompt"], "image": os.path.relpath(world / r["image"], tmp_path)})
                             + "\n" for r in recs))
    got = _score(["--ckpt", TEACHER, "--jsonl", str(jsonl), "--dimensions", "alignment", "--max-new-tokens", "96"],
                 tmp_path)
    assert got["mode"] == "reasoning" and len(got["scores"]) == 2
    assert all(r["valid"] for r in got["scores"]), "the shipped teacher writes a score line within 96 tokens"


def test_score_runs_zero_shot_on_a_hugging_face_folder(world, tmp_path):
    folder = tmp_path / "hf"
    m = tiny_world.tiny_score_model(seed=3)
    for part in (m.vlm, m.tokenizer, m.image_processor):
        part.save_pretrained(folder)
    r = _records(world)[0]
    got = _score(["--ckpt", str(folder), "--prompt", r["prompt"], str(world / r["image"]), "--dimensions",
                  "aesthetics"], tmp_path)
    assert got["mode"] == "direct" and len(got["scores"]) == 1 and 1.0 <= got["scores"][0]["mu"] <= 5.0


@pytest.mark.parametrize("case", ["missing", "not-an-image", "bad-line", "no-prompt", "bad-dimension"])
def test_score_gives_one_line_errors(world, tmp_path, capsys, case):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"prompt": "a red circle top left", "image": "x.png"}\n{"prompt": 3}\n')
    argv, want = {
        "missing": (["--prompt", "x", str(tmp_path / "none.png")], "none.png: no such file"),
        "not-an-image": (["--prompt", "x", str(bad)], "bad.png: not a readable image"),
        "bad-line": (["--jsonl", str(jsonl)], "q.jsonl:2: a record needs"),
        "no-prompt": ([str(bad)], "give --prompt"),
        "bad-dimension": (["--prompt", "x", str(bad), "--dimensions", "beauty"], "--dimensions beauty"),
    }[case]
    with pytest.raises(SystemExit) as e:
        evaluation.main(["score", "--ckpt", STUDENT, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and want in err[0], err


def test_pairs_accuracy_per_dimension_and_for_the_aggregate(world, tmp_path, capsys):
    """Pairs from the tiny world's same-prompt records; eval.py pairs' accuracies equal those computed
    by hand from `eval.py score`'s mu of the same images, and the aggregate is the equal-weight mean."""
    recs = [r for r in _records(world) if r["dimension"] == "alignment"]
    pairs = [{"id": f"{a['id']}|{b['id']}", "prompt": a["prompt"], "image_a": os.path.relpath(world / a["image"], tmp_path),
              "image_b": os.path.relpath(world / b["image"], tmp_path), "preferred": "a" if a["score"] > b["score"] else "b"}
             for i, a in enumerate(recs) for b in recs[i + 1:] if a["group"] == b["group"] and a["score"] != b["score"]]
    assert len(pairs) >= 3
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "acc.json"
    evaluation.main(["pairs", "--ckpt", STUDENT, "--pairs", str(path), "--json", str(out)])
    acc = json.loads(out.read_text())["accuracy"]
    assert set(acc) == {"alignment", "realism", "aesthetics", "plausibility", "aggregate"}
    assert "aggregate" in capsys.readouterr().out
    # by hand: each image's mu from `score`, then the share of pairs ordered as preferred
    mus = {}
    for p in pairs:
        for k in ("image_a", "image_b"):
            if (p["prompt"], p[k]) not in mus:
                got = _score(["--ckpt", STUDENT, "--prompt", p["prompt"], str(tmp_path / p[k])], tmp_path)
                mus[(p["prompt"], p[k])] = {r["dimension"]: r["mu"] for r in got["scores"]}
    pref = [p["preferred"] for p in pairs]
    per_dim = {}
    for d in ("alignment", "realism", "aesthetics", "plausibility"):
        a = np.array([mus[(p["prompt"], p["image_a"])][d] for p in pairs])
        b = np.array([mus[(p["prompt"], p["image_b"])][d] for p in pairs])
        per_dim[d] = (a, b)
        assert acc[d] == pytest.approx(pair_accuracy(a, b, pref), abs=1e-9), d
    agg_a = aggregate_mu({d: v[0] for d, v in per_dim.items()})
    agg_b = aggregate_mu({d: v[1] for d, v in per_dim.items()})
    assert np.allclose(agg_a, np.mean([v[0] for v in per_dim.values()], axis=0))
    assert acc["aggregate"] == pytest.approx(pair_accuracy(agg_a, agg_b, pref), abs=1e-9)
