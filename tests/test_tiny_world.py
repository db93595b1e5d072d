"""
Tests for tiny_world.py: the generic rubric, the tower stage's labels and training, the trace check.

Run: python -m pytest tests/test_tiny_world.py -q   (about half a minute, CPU only)
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import data as metrics  # noqa: E402
import tiny_world  # noqa: E402


def scene(objects, **defects):
    objs = [dict(quadrant=q, color=c, shape=s, offset=o, support=sup) for q, c, s, o, sup in objects]
    base = dict(noise="none", blur="none", artifacts="none", clutter="none", contrast="normal", seed=0)
    return dict(objects=objs, **{**base, **defects})


def test_generic_rubric_counts_defects_not_their_weight():
    items = tiny_world.parse_prompt("a red circle top left and a blue square bottom right")
    s = scene([("top left", "red", "circle", 1, "floating"), ("bottom right", "green", "square", 0, "hovering"),
               ("top right", "blue", "cross", 0, "grounded")],
              noise="strong", blur="mild", clutter="strong", contrast="low")
    # alignment: one wrong colour + one extra = 2 defects; the annotators' rubric: 1.5 + 1 = 2.5
    # realism: strong noise + mild blur = 2 defects; annotators 2.5 + 1 = 3.5
    # aesthetics: off center + clutter + low contrast = 3; annotators 1 + 2 + 1.5 = 4.5
    # plausibility: floating + hovering = 2; annotators 2 + 0.5 = 2.5
    assert tiny_world.defect_counts(s, items) == {"alignment": 2, "realism": 2, "aesthetics": 3, "plausibility": 2}
    assert tiny_world.generic_scores(s, items) == {"alignment": 3.0, "realism": 3.0, "aesthetics": 2.0, "plausibility": 3.0}
    assert tiny_world.true_scores(s, items) == {"alignment": 2.5, "realism": 1.5, "aesthetics": 1.0, "plausibility": 2.5}
    # four defects or more reach the floor, 1
    many = scene([("top left", "red", "circle", 0, "floating")] + [(q, "red", "cross", 0, "sunk") for q in
                  ("top right", "bottom left", "bottom right")])
    assert tiny_world.generic_scores(many, items)["plausibility"] == 1.0
    # the conspicuous rubric: the same scene, the mild blur and the hovering square free
    assert tiny_world.defect_counts(s, items, free=("mild",)) == {"alignment": 2, "realism": 1, "aesthetics": 3,
                                                                  "plausibility": 1}
    assert tiny_world.conspicuous_scores(s, items) == {"alignment": 3.0, "realism": 4.0, "aesthetics": 2.0,
                                                       "plausibility": 4.0}
    mild = scene([("top left", "red", "circle", 0, "hovering")], noise="mild", blur="mild", artifacts="mild",
                 clutter="mild")
    assert tiny_world.conspicuous_scores(mild, items) == {"alignment": 4.0, "realism": 5.0, "aesthetics": 5.0,
                                                          "plausibility": 5.0}
    assert tiny_world.generic_scores(mild, items) == {"alignment": 4.0, "realism": 2.0, "aesthetics": 4.0,
                                                      "plausibility": 4.0}
    # the coarse rubric: conspicuous, and the extra blue cross and the off-center circle free too
    assert tiny_world.coarse_scores(s, items) == {"alignment": 4.0, "realism": 4.0, "aesthetics": 3.0,
                                                  "plausibility": 4.0}
    assert tiny_world.coarse_scores(mild, items) == tiny_world.conspicuous_scores(mild, items)
    # free may name any kind rubric_on_lines prices, and defect_counts honours each: wrong items too
    assert tiny_world.defect_counts(s, items, free=("align",))["alignment"] == 1
    assert tiny_world.defect_counts(s, items, free=("align", "extra"))["alignment"] == 0
    with pytest.raises(ValueError, match="hovering"):
        tiny_world.defect_counts(s, items, free=("hovering",))


@pytest.mark.parametrize("rubric", ["generic", "conspicuous", "coarse"])
def test_pretraining_world_traces_end_on_the_generic_rubric(tmp_path, rubric):
    scores = tiny_world.TRACE_RUBRICS[rubric]
    recs = tiny_world.make_world(str(tmp_path), n=6, seed=3, trace_rubric=rubric)
    for r in recs:
        items = tiny_world.parse_prompt(r["prompt"])
        assert data.parse_score(r["trace"]) == data.score_to_level(scores(r["scene"], items)[r["dimension"]])
        assert r["score"] == data.aggregate(r["scores"])  # the labels stay the annotators'
    assert any(scores(r["scene"], tiny_world.parse_prompt(r["prompt"]))[r["dimension"]] != r["true_score"]
               for r in recs)
    with pytest.raises(ValueError, match="trace_rubric"):
        tiny_world.make_world(str(tmp_path), n=2, trace_rubric="annotators")


def test_holdout_prompts_are_never_drawn(tmp_path):
    """render --holdout: a world of unlabeled records that shares no prompt with a labeled test split;
    the same seed without it does draw some of them (one-item prompts: 100 exist, 60 drawn)."""
    tiny_world.main(["render", "--out", str(tmp_path / "w"), "--n", "40", "--seed", "5", "--candidates", "1",
                     "--items-p", "1,0,0", "--test-frac", "0.5"])
    held = {r["prompt"] for r in data.load_jsonl(str(tmp_path / "w" / "test.jsonl"))}
    args = ["render", "--n", "60", "--seed", "6", "--candidates", "1", "--items-p", "1,0,0", "--test-frac", "0"]
    tiny_world.main(args + ["--out", str(tmp_path / "free")])
    tiny_world.main(args + ["--out", str(tmp_path / "held"), "--holdout", str(tmp_path / "w" / "test.jsonl")])
    free = {r["prompt"] for r in data.load_jsonl(str(tmp_path / "free" / "train.jsonl"))}
    drawn = [r["prompt"] for r in data.load_jsonl(str(tmp_path / "held" / "train.jsonl"))]
    assert free & held and not set(drawn) & held and len(set(drawn)) == 60
    with pytest.raises(SystemExit) as e:
        tiny_world.main(args + ["--out", str(tmp_path / "x"), "--holdout", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2


def test_a_world_of_repeated_one_item_prompts_keeps_its_test_prompts_out_of_train(tmp_path):
    """items_p=(1, 0, 0) with repeat_prompts: more prompts than the 100 one-item ones that exist,
    every one naming one object, and the split still by prompt text (the base's first stage)."""
    recs = tiny_world.make_world(str(tmp_path), n=120, seed=4, candidates=1, items_p=(1, 0, 0), repeat_prompts=True,
                            test_frac=0.1, trace_rubric="generic")
    assert len(recs) == 120 * len(tiny_world.DIMENSIONS)
    assert all(len(tiny_world.parse_prompt(r["prompt"])) == 1 for r in recs)
    train = {r["prompt"] for r in recs if r["split"] == "train"}
    test = {r["prompt"] for r in recs if r["split"] == "test"}
    assert test and train and not train & test
    assert len(train | test) < 120  # prompts did repeat
    with pytest.raises(ValueError, match="items_p"):
        tiny_world.make_world(str(tmp_path), n=2, items_p=(0.5, 0.5, 0.5))
    with pytest.raises(SystemExit):
        tiny_world.get_args(["render", "--out", str(tmp_path), "--items-p", "1,0"])


def test_scene_labels():
    s = scene([("top right", "blue", "diamond", -1, "sunk")], noise="mild", clutter="strong", contrast="low")
    y = tiny_world.scene_labels(s)
    # quadrants in reading order; only top right holds an object
    assert y["color"] == [0, 1 + list(tiny_world.COLORS).index("blue"), 0, 0]
    assert y["shape"] == [0, 1 + tiny_world.SHAPES.index("diamond"), 0, 0]
    assert y["offset"] == [-100, 0, -100, -100] and y["support"] == [-100, tiny_world.SUPPORTS.index("sunk"), -100, -100]
    assert (y["noise"], y["blur"], y["artifacts"], y["clutter"], y["contrast"]) == (1, 0, 0, 2, 1)


def test_tower_stage_learns_the_scene_labels():
    torch.manual_seed(0)
    model = tiny_world.tiny_score_model(seed=0, **tiny_world.TINY_SIZES["student"])
    images, labels = tiny_world.batch_of_scenes(np.random.default_rng(99), 64)
    tokens = tiny_world.tower_tokens(model, images)
    assert tokens.shape == (64, 4, model.vlm.config.text_config.hidden_size)  # one token per quadrant
    before = model.vision_tower().patch_embed.proj.weight.detach().clone()
    acc = tiny_world.train_tower(model, steps=150, batch=32, lr=3e-3, seed=0, log_every=1000, eval_images=64)
    assert not torch.equal(before, model.vision_tower().patch_embed.proj.weight)  # the tower itself trained
    # majority-class rates: ~0.5 for colour (empty quadrants), ~0.7 for blur (none); 150 steps are
    # a fraction of the stage (3,000), enough to be clearly above both
    assert acc["color"] > 0.65 and acc["blur"] > 0.9, acc


class _WorldTraces:
    """A stand-in model whose reasoning-mode traces are the world's own, for check_traces."""

    def __init__(self, wrong_verdicts=False):
        self.wrong = wrong_verdicts

    def eval(self):
        return self

    def score(self, prompts, images, dims, mode, max_new_tokens):
        from types import SimpleNamespace

        traces, mean = [], []
        for p, d, r in zip(prompts, dims, self.records):
            t = tiny_world.make_trace(r["scene"], tiny_world.parse_prompt(p), d)
            traces.append(t.replace(", no.", ", yes.") if self.wrong else t)
            mean.append(tiny_world.generic_scores(r["scene"], tiny_world.parse_prompt(p))[d])  # its score: the generic scale
        return SimpleNamespace(traces=traces, mean=torch.tensor(mean))


def test_rubric_on_lines_prices_the_worlds_own_traces_as_the_scene(tmp_path):
    tiny_world.make_world(str(tmp_path), n=40, seed=2)
    recs = data.load_jsonl(str(tmp_path / "train.jsonl"))
    for r in recs:
        items, d = tiny_world.parse_prompt(r["prompt"]), r["dimension"]
        trace = tiny_world.make_trace(r["scene"], items, d)
        assert tiny_world.rubric_on_lines(trace, d, items) == tiny_world.true_scores(r["scene"], items)[d], trace
        assert tiny_world.rubric_on_lines(trace, d, items, "generic") == tiny_world.generic_scores(r["scene"], items)[d]
        for rubric in ("conspicuous", "coarse"):
            assert (tiny_world.rubric_on_lines(trace, d, items, rubric)
                    == tiny_world.TRACE_RUBRICS[rubric](r["scene"], items)[d]), (rubric, trace)
    # it reads the lines, not the scene: a trace that calls a wrong colour right costs nothing
    line = "top left red circle: blue circle, no."
    items = tiny_world.parse_prompt("a red circle top left")
    assert tiny_world.rubric_on_lines(line + "\nextra: none.\nScore: 9", "alignment", items) == 5 - tiny_world.ALIGN_PENALTY["color"]
    assert tiny_world.rubric_on_lines(line.replace("no.", "yes.") + "\nextra: none.", "alignment", items) == 5.0
    assert tiny_world.rubric_on_lines("noise: strong.\nblur: mild.\nartifacts: none.", "realism", []) == 1.5
    assert tiny_world.rubric_on_lines("noise: strong.\nblur: mild.\nartifacts: none.", "realism", [], "generic") == 3.0
    assert tiny_world.rubric_on_lines("noise: strong.\nblur: mild.\nartifacts: none.", "realism", [], "conspicuous") == 4.0
    assert tiny_world.rubric_on_lines(line + "\nextra: blue cross.", "alignment", items, "coarse") == 4.0
    assert tiny_world.rubric_on_lines(line + "\nextra: blue cross.", "alignment", items, "conspicuous") == 3.0
    with pytest.raises(ValueError, match="rubric"):
        tiny_world.rubric_on_lines("noise: strong.", "realism", [], "annotators")


def test_check_traces_scores_the_worlds_own_traces_perfectly(tmp_path):
    tiny_world.make_world(str(tmp_path), n=8, seed=1)
    recs = data.load_jsonl(str(tmp_path / "train.jsonl"))
    fake = _WorldTraces()
    fake.records = recs
    table, kinds = tiny_world.check_traces(fake, recs, batch_size=len(recs))
    for d in data.DIMENSIONS:
        assert table[d]["lines"] == 1.0 and table[d]["trace"] == 1.0 and table[d]["score_true"] == 1.0
    # HPA: its own score is the generic rubric's, its lines priced by the annotators' are the true scores
    labels, groups = [r["score"] for r in recs], [(r["prompt"], r["dimension"]) for r in recs]
    true = [tiny_world.true_scores(r["scene"], tiny_world.parse_prompt(r["prompt"]))[r["dimension"]] for r in recs]
    generic = [tiny_world.generic_scores(r["scene"], tiny_world.parse_prompt(r["prompt"]))[r["dimension"]] for r in recs]
    assert table["overall"]["hpa"] == pytest.approx(metrics.hpa(generic, labels, groups))
    assert table["overall"]["hpa_lines"] == pytest.approx(metrics.hpa(true, labels, groups))
    assert table["overall"]["hpa_lines"] != table["overall"]["hpa"]
    # a model that says "yes" where the world says "no" loses exactly those alignment lines
    liar = _WorldTraces(wrong_verdicts=True)
    liar.records = recs
    table, kinds = tiny_world.check_traces(liar, recs, batch_size=len(recs))
    n_no = sum(l.endswith(", no.") for r in recs if r["dimension"] == "alignment" for l in r["trace"].split("\n"))
    n_lines = sum(len(r["trace"].split("\n")) - 1 for r in recs if r["dimension"] == "alignment")
    assert n_no > 0 and table["alignment"]["lines"] == pytest.approx(1 - n_no / n_lines)
    # the item lines' split: every quadrant read right, only the "no" verdicts wrong
    n_items = sum(tiny_world.line_kind("alignment", l) == "item"
                  for r in recs if r["dimension"] == "alignment" for l in r["trace"].split("\n")[:-1])
    assert kinds["item: read"] == 1.0 and kinds["item: verdict"] == pytest.approx(1 - n_no / n_items)
    assert table["realism"]["lines"] == 1.0


def test_the_shipped_bases_carry_the_tokenizer_the_code_builds():
    # OPD needs one tokenizer for teacher and student, and `make base` must rebuild what ships: a
    # word added to a rubric or an instruction changes the tokenizer, and then the bases are stale
    from model import read_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [os.path.join(root, "assets", f) for f in ("tiny_base.safetensors", "tiny_student_base.safetensors")]
    if not all(os.path.exists(p) for p in paths):
        pytest.skip("tiny bases not built")
    built = tiny_world.build_tiny_tokenizer().backend_tokenizer.to_str()
    for p in paths:
        meta, _ = read_checkpoint(p)
        assert meta["tokenizer"] == built, f"{p} was built with another tokenizer: rerun `make base`"


def test_tower_stage_writes_the_prompt_version_asked_for(tmp_path, monkeypatch):
    """tiny_world.py tower --prompt-version zr-rubric-v1 (make base: the shipped bases) saves a model that keeps
    scoring with the image first; the default is the latest prompts. (The training itself is tested above.)"""
    from model import PROMPT_VERSION, ScoreModel

    monkeypatch.setattr(tiny_world, "train_tower", lambda model, **kw: {})
    for version in ("zr-rubric-v1", None):
        out = tmp_path / f"{version}.safetensors"
        argv = ["tower", "--size", "student", "--steps", "1", "--out", str(out)]
        tiny_world.tower_stage(tiny_world.get_args(argv + (["--prompt-version", version] if version else [])))
        assert ScoreModel.load(out).prompt_version == (version or PROMPT_VERSION)
