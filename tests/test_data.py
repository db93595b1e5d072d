"""
Tests for data.py (record validation, label aggregation, pairs) and the synthetic world of tiny_world.py.

Run: python -m pytest tests/test_data.py -q   (a few seconds, CPU only)
"""

import json
import os
import re
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import (DIMENSIONS, SCORE_MARKER, aggregate, level_to_score, load_jsonl, make_pairs,  # noqa: E402
                  parse_score, score_to_level)
from tiny_world import VOCAB, make_caption, make_trace, make_world, parse_prompt, render_scene, true_scores  # noqa: E402

GOOD = {"id": "a", "prompt": "a red circle top left", "image": "img.png", "dimension": "realism",
        "scores": [3.0, 3.5, 4.0], "score": 3.5}

def write_jsonl(tmp_path, lines):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=30, seed=0)
    return out, load_jsonl(str(out / "train.jsonl")) + load_jsonl(str(out / "test.jsonl"))

# -----------------------------------------------------------------------------
# records

def test_load_good_records(tmp_path):
    no_score = {k: v for k, v in GOOD.items() if k != "score"}
    path = write_jsonl(tmp_path, [GOOD, "", dict(no_score, id="b", extra_key=[1, 2])])
    recs = load_jsonl(str(path))
    assert [r["id"] for r in recs] == ["a", "b"]
    assert recs[1]["score"] == 3.5  # filled in by aggregate() when only annotations are given
    assert recs[1]["extra_key"] == [1, 2]  # extra keys are kept
    assert recs[0]["image"] == "img.png"  # kept as written ...
    assert os.path.isabs(recs[0]["image_path"]) and os.path.isfile(recs[0]["image_path"])  # ... and resolved

BAD = {
    "bad JSON": '{"id": "x", ',
    "not an object": "[1, 2]",
    "missing key": {k: v for k, v in GOOD.items() if k != "prompt"},
    "missing labels": {k: v for k, v in GOOD.items() if k not in ("scores", "score")},
    "unknown dimension": dict(GOOD, dimension="beauty"),
    "annotation off the grid": dict(GOOD, scores=[3.0, 3.3, 4.0]),
    "annotation too high": dict(GOOD, scores=[3.0, 5.5, 4.0]),
    "annotation too low": dict(GOOD, scores=[0.5, 3.0, 4.0]),
    "annotation not a number": dict(GOOD, scores=[3.0, "4", 4.0]),
    "aggregate out of range": dict(GOOD, score=5.2),
    "missing image": dict(GOOD, image="nope.png"),
    "duplicate id": dict(GOOD),
}

@pytest.mark.parametrize("kind", list(BAD))
def test_load_bad_record_names_file_and_line(tmp_path, kind):
    # two good lines, then the bad record on line 3
    path = write_jsonl(tmp_path, [GOOD, dict(GOOD, id="b"), BAD[kind]])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
        load_jsonl(str(path))

def test_unlabeled_records(tmp_path):
    unlabeled = {k: v for k, v in GOOD.items() if k not in ("scores", "score")}
    path = write_jsonl(tmp_path, [unlabeled])
    assert load_jsonl(str(path), labeled=False)[0]["id"] == "a"
    with pytest.raises(ValueError, match="missing keys"):
        load_jsonl(str(path))
    # labels that are present are still checked
    path = write_jsonl(tmp_path, [dict(GOOD, scores=[9.0])])
    with pytest.raises(ValueError, match=":1:"):
        load_jsonl(str(path), labeled=False)

def test_aggregate():
    assert aggregate([1, 2, 3, 4, 5]) == 3.0  # drop 1 and 5
    assert aggregate([5, 1, 5, 2, 5]) == 4.0  # drop one 1 and one 5: (2 + 5 + 5) / 3
    assert aggregate([4.5, 1.0, 3.0]) == 3.0  # three annotations: the median remains
    assert aggregate([3.0, 4.0]) == 3.5  # fewer than three: plain mean
    assert aggregate([2.5]) == 2.5
    with pytest.raises(ValueError):
        aggregate([])

def test_levels():
    for level in range(1, 10):
        assert score_to_level(level_to_score(level)) == level
    assert score_to_level(1.0) == 1 and score_to_level(5.0) == 9 and score_to_level(3.5) == 6
    assert score_to_level(3.25) == 6  # off-grid rounds half up, not to even
    with pytest.raises(ValueError):
        score_to_level(5.5)

def test_make_pairs():
    def rec(id, prompt, dim, score):
        return {"id": id, "prompt": prompt, "dimension": dim, "score": score}
    recs = [rec("a", "p1", "realism", 4.0), rec("b", "p1", "realism", 2.0), rec("c", "p1", "realism", 4.0),
            rec("d", "p1", "alignment", 1.0), rec("e", "p2", "realism", 3.0)]
    pairs = [(w["id"], l["id"]) for w, l in make_pairs(recs)]
    # only p1/realism has several records; a-c is a tie; d and e are alone in their groups
    assert pairs == [("a", "b"), ("c", "b")]
    assert all(w["score"] > l["score"] for w, l in make_pairs(recs))

# -----------------------------------------------------------------------------
# the synthetic world

def test_world_is_deterministic(tmp_path):
    def files(d):
        return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
                for r, _, fs in os.walk(d) for f in fs}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_world(str(tmp_path / name), n=8, seed=seed)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) == 8 * 4 + 2
    assert a["train.jsonl"] != c["train.jsonl"]

def test_world_records(world):
    out, recs = world
    assert len(recs) == 30 * 4 * len(DIMENSIONS)
    train = {r["prompt"] for r in recs if r["split"] == "train"}
    test = {r["prompt"] for r in recs if r["split"] == "test"}
    assert train and test and not train & test  # disjoint prompts
    assert len(test) == 6  # test_frac 0.2 of 30
    for r in recs:
        img = Image.open(r["image_path"])
        assert img.size == (64, 64) and img.mode == "RGB"
        quads = [o["quadrant"] for o in r["scene"]["objects"]]
        assert 1 <= len(quads) == len(set(quads)) <= 4  # at most one object per quadrant
        assert r["caption"] == make_caption(r["scene"])
        assert r["true_score"] == true_scores(r["scene"], parse_prompt(r["prompt"]))[r["dimension"]]
    # every prompt and dimension has a pair, and every prompt a same-count near miss
    assert len({(w["group"], w["dimension"]) for w, _ in make_pairs(recs)}) == 30 * len(DIMENSIONS)
    for g in {r["group"] for r in recs}:
        al = [r for r in recs if r["group"] == g and r["dimension"] == "alignment"]
        n_items = len(parse_prompt(al[0]["prompt"]))
        assert any(r["true_score"] < 5 and len(r["scene"]["objects"]) == n_items for r in al)

def test_traces(world):
    _, recs = world
    for r in recs:
        t = r["trace"]
        level = score_to_level(r["true_score"])
        assert t.endswith(f"\n{SCORE_MARKER} {level}") and t.count(SCORE_MARKER) == 1
        assert parse_score(t) == level
        assert t == make_trace(r["scene"], parse_prompt(r["prompt"]), r["dimension"])
        lines = t.split("\n")
        if r["dimension"] == "alignment":  # one line per prompt item, then extras, then the score
            assert len(lines) == len(parse_prompt(r["prompt"])) + 2 and lines[-2].startswith("extra: ")
        if r["dimension"] == "realism":
            assert [l.split(":")[0] for l in lines] == ["noise", "blur", "artifacts", "Score"]
    assert parse_score("no score here") is None

def test_vocab_covers_all_text(world):
    _, recs = world
    words = set()
    for r in recs:
        text = " ".join([r["prompt"], r["caption"], r["trace"], make_caption(r["scene"], detail=True)])
        words |= set(re.findall(r"[A-Za-z]+", text))
    assert words <= set(VOCAB) and VOCAB == sorted(VOCAB)

def test_alignment_scores():
    items = parse_prompt("a red circle top left and a blue square bottom right")
    assert items == [{"quadrant": "top left", "color": "red", "shape": "circle"},
                     {"quadrant": "bottom right", "color": "blue", "shape": "square"}]
    def scene(objects):
        objs = [dict(quadrant=q, color=c, shape=s, offset=0, support="grounded") for q, c, s in objects]
        return dict(objects=objs, noise="none", blur="none", artifacts="none", clutter="none",
                    contrast="normal", seed=0)
    clean = scene([("top left", "red", "circle"), ("bottom right", "blue", "square")])
    assert true_scores(clean, items) == {d: 5.0 for d in DIMENSIONS}  # the maximum everywhere
    near = scene([("top left", "red", "circle"), ("bottom right", "green", "square")])
    assert true_scores(near, items)["alignment"] == 3.5  # one wrong color: 5 - 1.5
    assert make_trace(near, items, "alignment") == \
        "top left red circle: red circle, yes.\nbottom right blue square: green square, no.\nextra: none.\nScore: 6"
    moved = scene([("top right", "red", "circle"), ("bottom right", "blue", "square"),
                   ("bottom left", "yellow", "cross")])
    assert true_scores(moved, items)["alignment"] == 2.5  # moved 1.5, extra 1
    assert make_trace(moved, items, "alignment").split("\n")[0] == "top left red circle: empty, at top right."
    missing = scene([("bottom right", "blue", "triangle")])
    assert true_scores(missing, items)["alignment"] == 1.5  # missing 2, wrong shape 1.5
    # the defects change pixels, and rendering is a pure function of the scene
    base = render_scene(clean).tobytes()
    assert render_scene(clean).tobytes() == base
    for key, value in (("noise", "mild"), ("blur", "mild"), ("artifacts", "mild"), ("clutter", "mild"),
                       ("contrast", "low")):
        assert render_scene(dict(clean, **{key: value})).tobytes() != base, key
    for support in ("hovering", "floating", "sunk"):
        moved_obj = dict(clean, objects=[dict(clean["objects"][0], support=support), clean["objects"][1]])
        assert render_scene(moved_obj).tobytes() != base, support

def test_cli(tmp_path):
    # the script entry point writes the files a consumer expects
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..")
    subprocess.run([sys.executable, os.path.join(root, "tiny_world.py"), "render", "--out", str(tmp_path), "--n", "5",
                    "--seed", "1", "--candidates", "3", "--annotators", "3", "--test-frac", "0.4"], check=True)
    train, test = load_jsonl(str(tmp_path / "train.jsonl")), load_jsonl(str(tmp_path / "test.jsonl"))
    assert len(train) == 3 * 3 * 4 and len(test) == 2 * 3 * 4
    assert all(len(r["scores"]) == 3 for r in train)
    assert data.SCORE_MARKER == "Score:"
