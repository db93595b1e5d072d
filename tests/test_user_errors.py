"""
Bad input, as a user types it (issue 29). A user error is one line that names the flag, file or
line, exit status 2 in every script, no traceback, and nothing written; most are refused as the
command line is read, before any data or model loads. Then what must not mislead: eval.py's exit
status 3 on traces without a score, its --predictions lines, the train / test overlap warning, and
the checksum that catches finite garbage in a checkpoint.

Each case runs a script as `python SCRIPT ...` does: its __main__ block (runpy), its output captured,
an exception that escapes it a failure (a user would see a traceback). In this process, because a
fresh interpreter spends 5-9 s importing torch and transformers on two busy cores, and the cases
stop long before that matters; a few run in their own process too (the exit status the shell sees,
and a script started from another folder).

    python -m pytest tests/test_user_errors.py -q     (~2 min on 2 busy cores)
"""

import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

import tiny_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
BASE = os.path.join(ASSETS, "tiny_base.safetensors")  # reasoning mode
STUDENT_BASE = os.path.join(ASSETS, "tiny_student_base.safetensors")
STUDENT = os.path.join(ASSETS, "tiny_student.safetensors")  # direct mode (risd.py)
TRAINING = ("sft.py", "tiny_base.py", "gdso.py", "risd.py", "reward_ft.py")
pytestmark = pytest.mark.skipif(not os.path.exists(BASE), reason="tiny assets not built")


def run(script, *argv, cwd=ROOT, process=False):
    """Run `python SCRIPT ARGV` from `cwd` -> (returncode, stdout, stderr): in a subprocess with
    process=True, else in this process (runpy, sys.argv and the folder set, SystemExit caught as the
    interpreter would turn it into an exit status)."""
    argv = [str(a) for a in argv]
    path = os.path.join(ROOT, script)
    if process:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, path, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=300)
        return SimpleNamespace(returncode=res.returncode, stdout=res.stdout, stderr=res.stderr)
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [path, *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # as the interpreter does: an int is the status, anything else is printed, status 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            err.write(f"{e.code}\n")
            code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def refused(res, *names):
    """Exit status 2, no traceback, and one error line, the last, that names each of `names`; -> it."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    tiny_world.make_world(str(out), n=4, seed=0)  # 48 train records, 16 test records
    return str(out)


@pytest.fixture
def out(tmp_path):
    """An empty folder for a run's --out; a refused run leaves it empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    yield str(folder)
    assert os.listdir(folder) == [], "a refused run wrote something"


def _copy_world(world, folder, train=None, test=None):
    """A --data folder with the world's images and its train / test files, each changed by a function
    of its lines when given."""
    os.makedirs(folder)
    shutil.copytree(os.path.join(world, "images"), os.path.join(folder, "images"))
    for name, change in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(world, name), encoding="utf-8") as f:
            lines = f.read().splitlines()
        data = (change or (lambda ls: "\n".join(ls) + "\n"))(lines)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(folder)


# -----------------------------------------------------------------------------
# flags: refused as the command line is read


FLAGS = [
    ("sft.py", ["--lr", "nan"], ["--lr", "finite"]),
    ("sft.py", ["--lr", "-1"], ["--lr", "above 0", "-1"]),
    ("sft.py", ["--batch-size", "0"], ["--batch-size", "at least 1", "got 0"]),
    ("sft.py", ["--batch-size", "-32"], ["--batch-size", "got -32"]),
    ("sft.py", ["--micro-batch", "0"], ["--micro-batch", "got 0"]),
    ("sft.py", ["--batch-size", "two"], ["--batch-size", "whole number", "'two'"]),
    ("sft.py", ["--steps", "0"], ["--steps", "at least 1"]),
    ("sft.py", ["--save-every", "0"], ["--save-every"]),
    ("sft.py", ["--eval-every", "-1"], ["--eval-every", "at least 0"]),
    ("sft.py", ["--eval-limit", "-5"], ["--eval-limit"]),
    ("sft.py", ["--stop-after", "-1"], ["--stop-after"]),
    ("sft.py", ["--warmup", "-1"], ["--warmup"]),
    ("sft.py", ["--seed", "-1"], ["--seed"]),
    ("sft.py", ["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    ("sft.py", ["--clip", "0"], ["--clip", "above 0"]),
    ("sft.py", ["--rationale-weight", "-1"], ["--rationale-weight"]),
    ("sft.py", ["--train-only", "layers.(1"], ["--train-only", "'layers.(1'", "not a regular expression"]),
    ("tiny_base.py", ["--train-only", "*mlp"], ["--train-only", "not a regular expression"]),
    ("gdso.py", ["--train-only", "[mlp"], ["--train-only", "not a regular expression"]),
    ("risd.py", ["--teacher", BASE, "--train-only", "mlp)"], ["--train-only", "not a regular expression"]),
    ("tiny_base.py", ["--micro-batch", "-4"], ["--micro-batch"]),
    ("gdso.py", ["--group", "1"], ["--group", "at least 2", "got 1", "advantage"]),
    ("gdso.py", ["--group", "0"], ["--group", "got 0"]),
    ("gdso.py", ["--method", "grpo", "--group", "1"], ["--group", "got 1"]),
    ("gdso.py", ["--pairs", "0"], ["--pairs"]),
    ("gdso.py", ["--micro-pairs", "0"], ["--micro-pairs"]),
    ("gdso.py", ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("gdso.py", ["--lr", "-0.00005"], ["--lr", "above 0"]),
    ("gdso.py", ["--temperature", "-1"], ["--temperature"]),
    ("risd.py", ["--teacher", BASE, "--limit", "-1"], ["--limit", "got -1"]),
    ("risd.py", ["--teacher", BASE, "--traces", "0"], ["--traces"]),
    ("risd.py", ["--teacher", BASE, "--lr", "nan"], ["--lr"]),
    ("risd.py", ["--teacher", BASE, "--batch-size", "0"], ["--batch-size"]),
    ("risd.py", ["--teacher", "teacher.pt"], ["--teacher", "teacher.pt", ".safetensors"]),
    ("reward_ft.py", ["--reward", STUDENT, "--batch-size", "0"], ["--batch-size"]),
    ("reward_ft.py", ["--reward", STUDENT, "--steps", "-1"], ["--steps", "at least 0"]),
    ("reward_ft.py", ["--reward", STUDENT, "--lr", "inf"], ["--lr"]),
    ("reward_ft.py", ["--reward", STUDENT, "--stop-range", "20"], ["--stop-range 20", "--sample-steps 10"]),
    ("reward_ft.py", ["--reward", STUDENT, "--weights", "1,x"], ["--weights", "'1,x'"]),
    ("reward_ft.py", ["--reward", STUDENT, "--dimensions", "colour"], ["--dimensions", "colour"]),
    ("reward_ft.py", [], ["--reward", "required"]),
    ("reward_ft.py", ["--stage", "pretrain", "--generator", "some/pipeline"], ["--stage pretrain"]),
    ("eval.py", ["--limit", "-1"], ["--limit", "got -1"]),
    ("eval.py", ["--batch-size", "0"], ["--batch-size"]),
    ("eval.py", ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("eval.py", ["--min-valid", "1.5"], ["--min-valid"]),
    ("eval.py", ["--device", "gpu0"], ["--device", "gpu0"]),
    pytest.param("eval.py", ["--device", "cuda"], ["--device", "cuda", "no CUDA GPU"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    ("eval.py", ["rollouts", "--group", "0"], ["--group"]),
    ("tiny_world.py", ["render", "--n", "0"], ["--n", "got 0"]),
    ("tiny_world.py", ["render", "--n", "2"], ["--n 2", "test.jsonl would be empty"]),
    ("tiny_world.py", ["render", "--test-frac", "1"], ["--test-frac"]),
    ("tiny_world.py", ["render", "--noise", "nan"], ["--noise"]),
    ("tiny_world.py", ["render", "--holdout", "/nonexistent.jsonl"], ["--holdout", "/nonexistent.jsonl"]),
    ("tiny_world.py", ["check", "--ckpt", "/nonexistent.safetensors"], ["/nonexistent.safetensors", "not found"]),
    ("tiny_world.py", ["check", "--ckpt", BASE, "--data", "/nonexistent.jsonl"], ["/nonexistent.jsonl"]),
]


def _argv(script, argv, world, out):
    """A case's flags after the ones every run of its script needs (the case's win: argparse takes the last)."""
    if script in TRAINING:
        return ["--data", world, "--out", os.path.join(out, "run.safetensors"), *argv]
    if script == "eval.py":
        head = ["rollouts", "--ckpt", BASE] if argv[:1] == ["rollouts"] else ["--ckpt", "tiny"]
        return [*head, "--data", world, *argv[1 if argv[:1] == ["rollouts"] else 0:]]
    if argv[0] == "check":
        return ["check", "--data", os.path.join(world, "test.jsonl"), *argv[1:]]
    return [argv[0], "--out", os.path.join(out, "world"), *argv[1:]]  # tiny_world.py COMMAND


@pytest.mark.parametrize("script, argv, names", FLAGS)
def test_a_bad_flag_value_is_refused_before_anything_loads(script, argv, names, world, out):
    refused(run(script, *_argv(script, argv, world, out)), *names)


def _first_of_each_script(cases):
    picked = {}
    for case in cases:
        picked.setdefault((case.values if hasattr(case, "values") else case)[0], case)
    return list(picked.values())


@pytest.mark.parametrize("script, argv, names", _first_of_each_script(FLAGS))
def test_a_bad_flag_value_exits_2_in_its_own_process(script, argv, names, world, out):
    refused(run(script, *_argv(script, argv, world, out), process=True), *names)


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory):
    """A folder this user cannot write into: a read-only one, or (root writes anyway) a folder of a
    pseudo file system that takes no new files."""
    folder = str(tmp_path_factory.mktemp("read-only"))
    os.chmod(folder, 0o555)
    for candidate in (folder, "/sys/fs", "/proc"):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no folder here that this user cannot write")


NEEDS = {"risd.py": ["--teacher", BASE], "reward_ft.py": ["--reward", STUDENT]}  # each script's required flags


@pytest.mark.parametrize("script", TRAINING)
def test_out_without_the_extension_is_refused(script, world, out):
    refused(run(script, "--data", world, *NEEDS.get(script, []), "--out", os.path.join(out, "noext")),
            "--out", "noext", ".safetensors")


@pytest.mark.parametrize("where", ["unwritable", "under a file"])
def test_out_in_a_folder_that_cannot_be_written_is_refused_before_the_model(where, world, out, unwritable):
    if where == "unwritable":
        path, name = os.path.join(unwritable, "sub", "run.safetensors"), "cannot write into"
    else:
        blocker = os.path.join(out, "a-file")
        with open(blocker, "w") as f:
            f.write("not a folder")
        path, name = os.path.join(blocker, "run.safetensors"), "is a file, not a folder"
    refused(run("sft.py", "--data", world, "--out", path), "--out", name)
    if where != "unwritable":
        os.remove(blocker)


def test_eval_json_and_predictions_must_be_writable(world, out, unwritable):
    refused(run("eval.py", "--ckpt", "count-only", "--data", world, "--json", os.path.join(unwritable, "t.json")),
            "--json", unwritable)
    refused(run("eval.py", "--ckpt", "count-only", "--data", world, "--predictions", out), "--predictions", "folder")


# -----------------------------------------------------------------------------
# files: named by file and line, or by folder, in one line


def test_non_utf8_bytes_in_a_jsonl_name_the_file_and_line(world, tmp_path, out):
    def latin1(lines):  # the third record's prompt gets a Latin-1 é
        lines[2] = lines[2].replace('"prompt": "', '"prompt": "caf\u00e9 ', 1)
        return ("\n".join(lines) + "\n").encode("latin-1")

    folder = _copy_world(world, tmp_path / "latin", test=latin1)
    test = os.path.join(folder, "test.jsonl")
    refused(run("eval.py", "--ckpt", "count-only", "--data", test), f"{test}:3", "UTF-8", "0xe9")
    folder = _copy_world(world, tmp_path / "latin-train", train=latin1)
    refused(run("sft.py", "--data", folder, "--out", os.path.join(out, "s.safetensors")),
            f"{os.path.join(folder, 'train.jsonl')}:3", "UTF-8")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """The tiny teacher as a Hugging Face folder; the same with the student's weights in it; and with
    no image-processor settings."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, size in (("teacher", "teacher"), ("student", "student")):
        m = tiny_world.tiny_score_model(seed=3, **tiny_world.TINY_SIZES[size])
        folders[name] = str(root / name)
        m.vlm.save_pretrained(folders[name])
        m.tokenizer.save_pretrained(folders[name])
        m.image_processor.save_pretrained(folders[name])
    folders["mixed"] = str(root / "mixed")
    shutil.copytree(folders["teacher"], folders["mixed"])
    shutil.copy(os.path.join(folders["student"], "model.safetensors"), folders["mixed"])
    folders["no_processor"] = str(root / "no_processor")
    shutil.copytree(folders["teacher"], folders["no_processor"])
    os.remove(os.path.join(folders["no_processor"], "preprocessor_config.json"))
    return folders


def test_an_hf_folder_with_another_models_weights_is_named(hf_folders, world):
    line = refused(run("eval.py", "--ckpt", hf_folders["mixed"], "--data", world), hf_folders["mixed"],
                   "Qwen3_5ForConditionalGeneration", "differ in shape")
    assert "LOAD REPORT" not in line


def test_an_hf_folder_without_preprocessor_config_is_named(hf_folders, world):
    refused(run("eval.py", "--ckpt", hf_folders["no_processor"], "--data", world), hf_folders["no_processor"],
            "preprocessor_config.json")


def test_resume_after_init_of_another_architecture_names_both(world, tmp_path):
    path = str(tmp_path / "run.safetensors")  # a run of the student base, one step, one checkpoint set
    common_argv = ["--data", world, "--out", path, "--steps", "2", "--batch-size", "8", "--micro-batch", "8",
                   "--eval-every", "0", "--eval-limit", "4"]
    res = run("sft.py", *common_argv, "--init", STUDENT_BASE, "--stop-after", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    listing = sorted(os.listdir(tmp_path))
    # another --init changes the run: refused as such, before any model loads
    refused(run("sft.py", *common_argv, "--init", BASE, "--resume"), "--init", "--resume-override")
    # overridden, the model built from --init cannot continue a checkpoint of another config: both named
    refused(run("sft.py", *common_argv, "--init", BASE, "--resume", "--resume-override", "init"),
            "cannot resume", "another config", f"--init {BASE}")
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.fixture(scope="module")
def garbage(tmp_path_factory):
    """A checkpoint written with its checksum, then 4 KiB of its tensor data overwritten with zeros:
    finite garbage, which the NaN / inf check cannot see."""
    path = str(tmp_path_factory.mktemp("garbage") / "g.safetensors")
    tiny_world.tiny_score_model().save(path, mode="direct")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0" * 4096)
    return path


def test_finite_garbage_in_a_checkpoint_is_refused(garbage, world, out):
    refused(run("eval.py", "--ckpt", garbage, "--data", world, "--json", os.path.join(out, "t.json")),
            garbage, "checksum")
    refused(run("sft.py", "--data", world, "--init", garbage, "--out", os.path.join(out, "s.safetensors")),
            garbage, "checksum")


def test_the_checksum_is_written_checked_and_optional(tmp_path, garbage):
    from model import ScoreModel, read_checkpoint

    path = str(tmp_path / "m.safetensors")
    model = tiny_world.tiny_score_model()
    model.save(path)
    meta, _ = read_checkpoint(path)
    assert meta["checksum"].startswith("crc32:")
    with pytest.raises(ValueError, match="do not match the checksum"):
        ScoreModel.load(garbage)
    for name in sorted(os.listdir(ASSETS)):  # the shipped files predate checksums: they load as they are
        assert "checksum" not in read_checkpoint(os.path.join(ASSETS, name))[0], name


# -----------------------------------------------------------------------------
# exit status 2 in every script, and defaults found from anywhere


def test_risd_and_reward_ft_exit_2_on_a_user_error(world, tmp_path, out):
    refused(run("risd.py", "--teacher", STUDENT, "--data", world, "--out", os.path.join(out, "r.safetensors")),
            STUDENT, "reasoning-mode teacher")
    refused(run("reward_ft.py", "--data", world, "--reward", STUDENT, "--init", BASE, "--batch-size", "2",
                "--out", os.path.join(out, "g.safetensors")), "--init", BASE, "not a tiny generator")
    refused(run("reward_ft.py", "--data", world, "--reward", str(tmp_path / "none.safetensors"),
                "--out", os.path.join(out, "g.safetensors")), "none.safetensors", "no such file")
    folder = _copy_world(world, tmp_path / "no-trace", train=lambda lines: "".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "trace"}) + "\n" for line in lines))
    refused(run("tiny_base.py", "--data", folder, "--out", os.path.join(out, "b.safetensors")), "'trace'")


@pytest.mark.parametrize("script", ["risd.py", "reward_ft.py"])
def test_defaults_under_assets_are_found_from_another_folder(script, world, tmp_path):
    """Run from outside the repository: the default student / generator under assets/ loads, and one
    step trains and is saved."""
    path = os.path.join(str(tmp_path), "run.safetensors")
    argv = (["--teacher", BASE, "--batch-size", "8", "--micro-batch", "8", "--eval-limit", "4"] if script == "risd.py"
            else ["--reward", STUDENT, "--batch-size", "2", "--micro-batch", "2", "--eval-prompts", "2",
                  "--eval-samples", "1", "--grid-prompts", "2", "--sample-steps", "3", "--stop-range", "2"])
    res = run(script, "--data", world, "--out", path, "--steps", "1", "--eval-every", "0", *argv,
              cwd=str(tmp_path), process=True)
    assert res.returncode == 0 and os.path.isfile(path), res.stderr[-3000:]


def test_asset_defaults_are_absolute(monkeypatch, tmp_path):
    import gdso
    import reward_ft
    import risd

    monkeypatch.chdir(tmp_path)
    for path in (gdso.get_args([]).init, risd.get_args(["--teacher", BASE]).student,
                 reward_ft.get_args(["--reward", STUDENT]).init):
        assert os.path.isabs(path) and os.path.isfile(path), path


# -----------------------------------------------------------------------------
# results that cannot mislead


def test_traces_without_a_score_mark_the_table_and_exit_3(world, out):
    preds, table = os.path.join(out, "p.jsonl"), os.path.join(out, "t.json")
    res = run("eval.py", "--ckpt", STUDENT_BASE, "--data", world, "--limit", "2", "--mode", "reasoning",
              "--max-new-tokens", "2", "--predictions", preds, "--json", table, process=True)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "0.000 *" in res.stdout and "valid below --min-valid 0.9" in res.stdout, res.stdout
    assert "2 of 2 records have no score in their trace within --max-new-tokens 2" in res.stderr, res.stderr
    assert not os.path.exists(table)  # no summary takes it in
    with open(preds) as f:
        lines = [json.loads(line) for line in f]
    assert [r["valid"] for r in lines] == [False, False]
    assert all(len(r["probs"]) == 9 and abs(sum(r["probs"]) - 1) < 1e-4 for r in lines)
    assert {"id", "dimension", "mu", "sigma", "probs", "valid"} <= set(lines[0])
    os.remove(preds)


def test_predictions_and_limit(world, out):
    import eval as evaluation

    preds = os.path.join(out, "p.jsonl")
    evaluation.main(["--ckpt", "count-only", "--data", world, "--limit", "3", "--predictions", preds])
    with open(preds) as f:
        lines = [json.loads(line) for line in f]
    with open(os.path.join(world, "test.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f][:3]
    assert [r["id"] for r in lines] == ids and all(r["probs"] is None and r["valid"] for r in lines)
    os.remove(preds)


def test_a_checkpoint_without_the_extension_is_read_as_one_not_as_a_hub_id(world, tmp_path):
    path = str(tmp_path / "noext")
    shutil.copy(STUDENT, path)
    res = run("eval.py", "--ckpt", path, "--data", world, "--limit", "2")
    assert res.returncode == 0 and "(direct mode)" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("script", ["sft.py", "gdso.py", "risd.py"])
def test_train_test_overlap_is_a_warning_that_counts(script, world, tmp_path, out):
    folder = _copy_world(world, tmp_path / "leak", test=lambda lines: "\n".join(lines) + "\n" + "".join(
        open(os.path.join(world, "train.jsonl")).readlines()[:3]))
    big = ["--teacher", BASE, "--batch-size", "1000"] if script == "risd.py" else (
        ["--pairs", "1000"] if script == "gdso.py" else ["--batch-size", "1000", "--micro-batch", "1000"])
    res = run(script, "--data", folder, "--out", os.path.join(out, "x.safetensors"), *big)
    refused(res, "1000")  # the batch stops the run before any model; the warning came first
    test = os.path.join(folder, "test.jsonl")
    assert f"warning: of the 19 records of {test}, 3 share an id and 3 an image file with" in res.stdout + res.stderr


def test_train_only_that_matches_nothing_trainable_names_what_names_look_like(world, out):
    # "visual" matches only the vision tower, which --freeze-vision keeps frozen
    refused(run("sft.py", "--data", world, "--out", os.path.join(out, "run.safetensors"), "--train-only", "visual"),
            "--train-only 'visual'", "matches none of the", "--freeze-vision", "names look like vlm.model.")


def test_resume_with_other_trainable_parameters_or_world_size_is_one_line(world, tmp_path):
    """Past the flag check (--resume-override), a run whose trainable parameters differ (the vision tower
    unfrozen) cannot take the checkpoint's optimizer state, and a train.pt written by another number
    of ranks cannot give this rank its RNG state: each a one-line error, before anything is written."""
    import torch

    import common

    path = str(tmp_path / "run.safetensors")
    argv = ["--data", world, "--init", BASE, "--out", path, "--steps", "2", "--batch-size", "8", "--micro-batch", "8",
            "--eval-every", "0", "--eval-limit", "4"]
    res = run("sft.py", *argv, "--stop-after", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    refused(run("sft.py", *argv, "--resume", "--no-freeze-vision", "--resume-override", "freeze_vision"),
            "cannot resume", "optimizer state", "does not fit")
    train_file = os.path.join(common.newest_set(path), "train.pt")
    state = torch.load(train_file, weights_only=False)
    state["rng"] = state["rng"] * 2  # as if two ranks had written it
    torch.save(state, train_file)
    refused(run("sft.py", *argv, "--resume"), "cannot resume", "2 ranks", "same world size")


def test_tiny_world_check_refuses_records_that_carry_no_scene(world, tmp_path):
    # valid records, but not the world's own: nothing to compare the traces with
    lines = open(os.path.join(world, "test.jsonl")).read().splitlines()[:3]
    records = [json.loads(line) for line in lines]
    for r in records:
        r.pop("scene")
        r["image"] = os.path.join(world, r["image"])
    path = tmp_path / "outside.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    refused(run("tiny_world.py", "check", "--ckpt", BASE, "--data", path), str(path), "without a scene")
