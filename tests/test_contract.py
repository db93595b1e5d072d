"""
What a user's own data and model meet: the --data contract (a missing file is an error, the
synthetic world is rendered only when asked for), batch sizes and --steps checked before any model
loads, checkpoint sets that cannot tear silently, non-finite predictions reported, zero-shot
scoring of a Hugging Face model folder, and errors that name the file, line, record or flag (exit
status 2, no traceback). Most cases stop before a model is built, so the file runs in seconds.

    python -m pytest tests/test_contract.py -q
"""

import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch

import tiny_world
import common
import data
from tiny_world import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
needs_base = pytest.mark.skipif(not os.path.exists(BASE), reason="tiny assets not built")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=4, seed=0)  # 48 train records, 16 test records
    return str(out)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a script gets as far as loading a model: these errors come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")
    monkeypatch.setattr(common, "load_model", refuse)


def _user_error(capsys, fn, *args):
    """Run fn, expect exit status 2; -> the message on stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2, e.value.code
    return capsys.readouterr().err


def _sft(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")


def _folder(tmp_path, world, files):
    """A --data folder holding some of the world's files (and its images)."""
    out = tmp_path / "mine"
    shutil.copytree(os.path.join(world, "images"), out / "images")
    for name, src in files.items():
        shutil.copy(os.path.join(world, src), out / name)
    return str(out)


# -----------------------------------------------------------------------------
# the data contract


def test_a_missing_train_file_is_an_error_not_a_rendered_world(tmp_path, world, monkeypatch, capsys, no_model):
    import gdso
    import risd

    folder = _folder(tmp_path, world, {"test.jsonl": "test.jsonl"})
    err = _user_error(capsys, gdso.main, ["--data", folder, "--out", str(tmp_path / "g.safetensors")])
    assert os.path.join(folder, "train.jsonl") in err and "world:" in err, err
    err = _user_error(capsys, _sft, monkeypatch, ["--data", folder, "--out", str(tmp_path / "s.safetensors")])
    assert os.path.join(folder, "train.jsonl") in err, err
    # risd with only unlabeled records: the labeled test file is named
    only = _folder(tmp_path / "u", world, {"unlabeled.jsonl": "train.jsonl"})
    err = _user_error(capsys, risd.main, ["--teacher", BASE, "--data", only, "--out", str(tmp_path / "r.safetensors")])
    assert os.path.join(only, "test.jsonl") in err, err
    err = _user_error(capsys, gdso.main, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "g.safetensors")])
    assert "no such folder" in err
    assert sorted(os.listdir(folder)) == ["images", "test.jsonl"]  # nothing was rendered into it


def test_risd_distills_on_the_folders_unlabeled_jsonl(tmp_path, world, capsys, no_model):
    import risd

    # 4 unlabeled records beside a train.jsonl of 48: a batch of 8 does not fit the unlabeled file
    folder = _folder(tmp_path, world, {"test.jsonl": "test.jsonl", "train.jsonl": "train.jsonl"})
    with open(os.path.join(world, "train.jsonl")) as f, open(os.path.join(folder, "unlabeled.jsonl"), "w") as g:
        for line in f.readlines()[:4]:
            r = json.loads(line)
            g.write(json.dumps({k: r[k] for k in ("id", "prompt", "image", "dimension")}) + "\n")
    err = _user_error(capsys, risd.main, ["--teacher", BASE, "--data", folder, "--batch-size", "8"])
    assert "unlabeled.jsonl" in err and "lower --batch-size to at most 4" in err, err


def test_the_world_is_rendered_only_by_name(tmp_path, capsys):
    spec = f"world:n=3,seed=1,dir={tmp_path / 'w'}"
    train, test = common.data_files(spec, "train.jsonl", "test.jsonl")
    assert os.path.isfile(train) and os.path.isfile(test)
    before = os.path.getmtime(train)
    assert common.data_files(spec, "train.jsonl") == [train] and os.path.getmtime(train) == before  # reused
    err = _user_error(capsys, common.data_files, f"world:n=4,seed=1,dir={tmp_path / 'w'}", "train.jsonl")
    assert "n': 3" in err  # another world in the same folder is refused, not overwritten
    err = _user_error(capsys, common.data_files, "world:n=3,colour=red", "train.jsonl")
    assert "colour=red" in err


def test_a_batch_larger_than_the_data_names_the_flag_before_any_model(tmp_path, world, monkeypatch, capsys, no_model):
    import gdso

    # 12 records, the default batch of 32
    folder = _folder(tmp_path, world, {"test.jsonl": "test.jsonl"})
    with open(os.path.join(world, "train.jsonl")) as f, open(os.path.join(folder, "train.jsonl"), "w") as g:
        g.writelines(f.readlines()[:12])
    err = _user_error(capsys, _sft, monkeypatch, ["--data", folder])
    assert "--batch-size 32 is more than the 12 training items" in err and "at most 12" in err, err
    err = _user_error(capsys, gdso.main, ["--data", world, "--pairs", "500"])
    assert "lower --pairs to at most" in err, err


def test_zero_steps_and_an_empty_test_file_are_errors(tmp_path, world, monkeypatch, capsys, no_model):
    import eval as evaluation
    import gdso

    err = _user_error(capsys, gdso.main, ["--data", world, "--steps", "0"])
    assert "argument --steps: must be at least 1" in err
    err = _user_error(capsys, _sft, monkeypatch, ["--data", world, "--steps", "0"])
    assert "argument --steps: must be at least 1" in err
    folder = _folder(tmp_path, world, {"train.jsonl": "train.jsonl"})
    open(os.path.join(folder, "test.jsonl"), "w").close()
    err = _user_error(capsys, _sft, monkeypatch, ["--data", folder])
    assert f"{os.path.join(folder, 'test.jsonl')} holds no records" in err
    err = _user_error(capsys, evaluation.main, ["--ckpt", "count-only", "--data", os.path.join(folder, "test.jsonl")])
    assert "holds no records" in err


# -----------------------------------------------------------------------------
# records


def _write(tmp_path, world, change):
    """The world's first test record, changed, as a one-line JSONL beside the world's images."""
    with open(os.path.join(world, "test.jsonl")) as f:
        r = json.loads(f.readline())
    change(r)
    path = os.path.join(world, f"one-{len(os.listdir(world))}.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(r) + "\n")
    return path


def test_a_string_annotation_is_called_a_string(tmp_path, world):
    path = _write(tmp_path, world, lambda r: r.update(scores=["4.0", 4.0]))
    with pytest.raises(ValueError, match=r":1: annotation '4.0' is a string"):
        data.load_jsonl(path)


def test_a_score_that_disagrees_with_its_scores_warns_and_is_the_label(tmp_path, world):
    path = _write(tmp_path, world, lambda r: r.update(scores=[4.0, 4.0, 4.0], score=2.0))
    with pytest.warns(UserWarning, match=r"1 records give a 'score' that differs .* line 1, score 2.0 against 4"):
        (r,) = data.load_jsonl(path)
    assert r["score"] == 2.0


def test_an_unreadable_image_is_named_at_load_time(tmp_path, world):
    bad = os.path.join(world, "images", "not-an-image.png")
    with open(bad, "w") as f:
        f.write("hello")
    path = _write(tmp_path, world, lambda r: r.update(image="images/not-an-image.png"))
    with pytest.raises(ValueError, match=r":1: image .*not-an-image.png cannot be read"):
        data.load_jsonl(path)


@needs_base
def test_a_prompt_longer_than_the_context_is_named(tmp_path, world, capsys):
    import eval as evaluation

    path = _write(tmp_path, world, lambda r: r.update(id="long one", prompt="a red circle top left " * 230))
    err = _user_error(capsys, evaluation.main, ["--ckpt", BASE, "--data", path])
    assert "record 'long one' needs" in err and "more than the model's 1024" in err, err


# -----------------------------------------------------------------------------
# models: zero-shot from a folder, and what a bad one is told


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """The tiny model as a Hugging Face folder, written by save_pretrained."""
    out = str(tmp_path_factory.mktemp("hf"))
    m = tiny_world.tiny_score_model(seed=3)
    m.vlm.save_pretrained(out)
    m.tokenizer.save_pretrained(out)
    m.image_processor.save_pretrained(out)
    return out


def test_eval_scores_a_hugging_face_folder_zero_shot(hf_folder, world, tmp_path, capsys):
    import eval as evaluation
    test = os.path.join(world, "test.jsonl")
    out = str(tmp_path / "zs.eval.json")
    evaluation.main(["--ckpt", hf_folder, "--data", test, "--limit", "8", "--json", out])
    assert "(direct mode)" in capsys.readouterr().out
    records = data.load_jsonl(test)[:8]
    want = evaluation.table_from_predictions(records,
                                             evaluation.predict(tiny_world.tiny_score_model(seed=3), records, progress=False))
    with open(out) as f:
        got = json.load(f)["table"]
    assert got["overall"]["plcc"] == pytest.approx(want["overall"]["plcc"], abs=1e-6)
    evaluation.main(["--model", hf_folder, "--data", world, "--limit", "4", "--mode", "reasoning",
                     "--max-new-tokens", "4", "--min-valid", "0"])  # an untrained model's traces give no score
    assert "(reasoning mode)" in capsys.readouterr().out


def test_bad_model_folders_and_files_are_named(hf_folder, tmp_path, world, capsys):
    import eval as evaluation

    test = os.path.join(world, "test.jsonl")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(os.path.join(hf_folder, f), no_tok / f)
    err = _user_error(capsys, evaluation.main, ["--ckpt", str(no_tok), "--data", test])
    assert f"{no_tok}: no tokenizer files" in err, err
    err = _user_error(capsys, evaluation.main, ["--ckpt", str(tmp_path / "nowhere" / "model"), "--data", test])
    assert "no such folder or file" in err
    # a truncated weights file: in a folder, and as a score-model checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(hf_folder, cut)
    with open(cut / "model.safetensors", "rb+") as f:
        f.truncate(os.path.getsize(cut / "model.safetensors") // 2)
    err = _user_error(capsys, evaluation.main, ["--ckpt", str(cut), "--data", test])
    assert f"{cut / 'model.safetensors'}: not a readable .safetensors file" in err, err
    if os.path.exists(BASE):
        short = str(tmp_path / "short.safetensors")
        with open(BASE, "rb") as f, open(short, "wb") as g:
            g.write(f.read()[:100_000])
        err = _user_error(capsys, evaluation.main, ["--ckpt", short, "--data", test])
        assert f"{short}: not a readable .safetensors file" in err, err


@needs_base
def test_overwritten_bytes_in_a_checkpoint_are_detected(tmp_path, world, capsys):
    import eval as evaluation
    from model import ScoreModel

    bad = str(tmp_path / "bad.safetensors")
    shutil.copy(BASE, bad)
    with open(bad, "r+b") as f:  # 4 KiB in the middle of the tensor data, same size
        f.seek(os.path.getsize(bad) // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(ValueError, match="non-finite values"):
        ScoreModel.load(bad)
    err = _user_error(capsys, evaluation.main, ["--ckpt", bad, "--data", os.path.join(world, "test.jsonl")])
    assert bad in err and "non-finite" in err


def test_non_finite_predictions_are_counted_and_fail_the_eval(world, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    def nan_predict(model, records, *args, **kwargs):
        mu = np.linspace(1, 5, len(records))
        mu[[1, 4]] = np.nan
        n = len(records)
        return {"mu": mu, "sigma": np.zeros(n), "n_tokens": np.ones(n), "valid": np.ones(n, dtype=bool)}

    monkeypatch.setattr(evaluation, "predict", nan_predict)
    out = str(tmp_path / "t.json")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--ckpt", "tiny", "--data", os.path.join(world, "test.jsonl"), "--json", out])
    assert e.value.code == 1
    assert "2 of 16 records got a non-finite mu" in capsys.readouterr().err
    assert not os.path.exists(out)  # a table of NaN predictions is not written for a summary


# -----------------------------------------------------------------------------
# checkpoint sets


def _tiny_run():
    model = tiny_world.tiny_score_model()
    return model, common.build_optimizer(model, 1e-3)


def test_a_save_killed_between_its_files_leaves_the_last_set(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "run.safetensors")
    model, opt = _tiny_run()
    common.save_checkpoint(path, model, opt, step=2, frozen=model)
    assert common.load_resume(path, *_tiny_run(), frozen=_tiny_run()[0])[0] == 2  # an intact set resumes

    # step 3: the weights are written, then the process dies before the train.pt: nothing is committed
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, model, opt, step=3, frozen=model)
    monkeypatch.undo()
    assert common.load_resume(path, *_tiny_run(), frozen=_tiny_run()[0])[0] == 2
    assert json.loads(common._checkpoint_meta(path)["step"]) == 2  # NAME.safetensors: still the intact set's
    assert common.remove_orphans(path) == [f"{common.set_folder(path, 3)}.tmp-{os.getpid()}"]
    assert common.remove_orphans(path) == []


def test_an_old_style_pair_still_resumes_and_is_refused_torn(tmp_path, capsys):
    # NAME.safetensors + NAME.train.pt (+ NAME.ref.safetensors), written in place before sets
    path = str(tmp_path / "run.safetensors")
    model, opt = _tiny_run()
    common.save_checkpoint(path, model, opt, step=2, frozen=model)
    folder = common.newest_set(path)
    shutil.copy(os.path.join(folder, "train.pt"), common.train_path(path))
    shutil.copy(os.path.join(folder, "ref.safetensors"), common.ref_path(path))
    os.remove(path)
    shutil.copy(os.path.join(folder, "model.safetensors"), path)
    shutil.rmtree(common.sets_dir(path))
    assert common.resume_source(path)[3] == f"the old-style pair {path} + {common.train_path(path)}"
    assert common.load_resume(path, *_tiny_run(), frozen=_tiny_run()[0])[0] == 2

    # pi_ref from another step: refused, naming both files
    common.save_checkpoint(common.ref_path(path), model, step=1)
    err = _user_error(capsys, common.load_resume, path, *_tiny_run(), None, _tiny_run()[0])
    assert f"{common.ref_path(path)} is at step 1" in err and "train.pt at step 2" in err, err

    # the weights written at step 3, then the process died before the .train.pt
    common.save_checkpoint(path, model, step=3)
    err = _user_error(capsys, common.load_resume, path, *_tiny_run())
    assert "torn checkpoint set" in err and f"{path} is at step 3" in err and "train.pt at step 2" in err, err

    # the first set a run saves there replaces the pair: its train state and pi_ref go with it
    common.save_checkpoint(path, model, opt, step=4, frozen=model)
    assert not os.path.exists(common.train_path(path)) and not os.path.exists(common.ref_path(path))
    assert common.load_resume(path, *_tiny_run(), frozen=_tiny_run()[0])[0] == 4


def test_a_non_finite_gradient_stops_before_the_update():
    common.check_finite_step(0, torch.tensor(1.5))
    with pytest.raises(SystemExit, match="step 5: the gradient norm is nan"):
        common.check_finite_step(4, torch.tensor(float("nan")), 0.3)
