"""
Checkpoint sets (common.py, checkpoints): a run killed at any point of a save resumes from the last
intact set to the same weights and optimizer state, bit for bit, as a run never killed; a start
removes what killed saves left at its --out (and nothing else); --keep sets stay; and --resume
refuses flags that would change the run unless --resume-override names them.

The kills are real: sft.py runs in a subprocess with ZR_FAULT_AFTER=POINT@STEP, and common.fault_point
sends it SIGKILL at that point of the save of that step.

    python -m pytest tests/test_checkpoints.py -q            # add -m slow for every kill point and gdso.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
pytestmark = pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")

# 4 steps of batch 8, a set saved after every step
RUN = ["--init", BASE, "--steps", "4", "--batch-size", "8", "--micro-batch", "8", "--lr", "3e-3", "--warmup", "1",
       "--eval-every", "0", "--eval-limit", "4", "--save-every", "1"]
BEFORE_COMMIT = ("folder", "model", "train", "manifest")  # a kill here leaves the step-2 set the newest
AFTER_COMMIT = ("commit", "link", "pointer", "unlist", "prune")  # the step-3 set is committed
FAST = ("manifest", "commit")  # one on each side of the commit rename; the rest are slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=8, seed=1)
    return str(out)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1): another thread count
    sums in another order, and the runs compared here must agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The run never killed: its final weights and optimizer state."""
    out = str(tmp_path_factory.mktemp("reference") / "ref.safetensors")
    torch.set_num_threads(1)  # (before the function-scoped one_thread)
    sft.main([*RUN, "--data", world, "--out", out])
    return out


def _run(args, fault=None, script="sft.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop(common.FAULT_ENV, None)
    if fault:
        env[common.FAULT_ENV] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _optimizer_state(out):
    return torch.load(os.path.join(common.newest_set(out), "train.pt"), weights_only=False)["optimizer"]["state"]


def assert_same_run(a, b):
    """Two --out paths hold the same weights (NAME.safetensors) and AdamW state, bit for bit."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = _optimizer_state(a), _optimizer_state(b)
    assert oa.keys() == ob.keys() and all(torch.equal(v, ob[i][k]) for i in oa for k, v in oa[i].items())


def _left_over(out):
    """Temp files and folders at --out: what a killed save leaves."""
    folder = os.path.dirname(out)
    names = os.listdir(folder) + [os.path.join(os.path.basename(common.sets_dir(out)), n)
                                  for n in os.listdir(common.sets_dir(out))]
    return sorted(n for n in names if ".tmp-" in n or ".del-" in n)


def _steps(out):
    return sorted(json.load(open(os.path.join(f, common.MANIFEST)))["step"] for f in common.committed_sets(out))


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow)
                                   for p in BEFORE_COMMIT + AFTER_COMMIT])
def test_a_kill_at_any_point_of_a_save_resumes_to_the_same_run(world, reference, tmp_path, point):
    out = str(tmp_path / "run.safetensors")
    killed = _run([*RUN, "--data", world, "--out", out], fault=f"{point}@3")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])  # SIGKILL, at step 3's save
    # step 1's set goes once step 3's is committed and NAME.safetensors points at it
    assert _steps(out) == ([1, 2] if point in BEFORE_COMMIT else [2, 3] if point in ("unlist", "prune") else [1, 2, 3])
    if point in BEFORE_COMMIT:
        assert _left_over(out), "the kill came while the set was in its temp folder"
    resumed = _run([*RUN, "--data", world, "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step = 2 if point in BEFORE_COMMIT else 3
    assert f"resumed {out} at step {step} (from {common.set_folder(out, step)})" in resumed.stdout, resumed.stdout
    assert_same_run(reference, out)
    assert _left_over(out) == [] and _steps(out) == [3, 4]


class Killed(BaseException):
    """An in-process stand-in for the kill: nothing in a save catches it or cleans up after it."""


def test_a_kill_during_the_first_save_leaves_nothing_to_resume(world, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run.safetensors")

    def kill(name, step):
        if (name, step) == ("train", 1):
            raise Killed

    monkeypatch.setattr(common, "fault_point", kill)
    with pytest.raises(Killed):
        sft.main([*RUN, "--data", world, "--out", out])
    monkeypatch.undo()
    assert _left_over(out) == [f"run.ckpt/step-00000001.tmp-{os.getpid()}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.main([*RUN, "--data", world, "--out", out, "--resume"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: cannot resume: no checkpoint at")
    assert _left_over(out) == []  # the start removed the temp folder before it refused


def test_a_start_removes_what_killed_saves_left_and_keeps_keep_sets(world, reference, tmp_path, capsys):
    out = str(tmp_path / "run.safetensors")
    orphans = [f"{common.set_folder(out, 7)}.tmp-99999", f"{common.set_folder(out, 5)}.del-99999"]
    for d in orphans:
        os.makedirs(d)
        open(os.path.join(d, "train.pt"), "wb").close()
    files = [f"{out}.tmp-99999", f"{common.train_path(out)}.tmp-99999", f"{common.ref_path(out)}.tmp-99999"]
    other = str(tmp_path / "run2.safetensors.tmp-99999")  # another --out's: not this run's to remove
    for f in [*files, other]:
        open(f, "wb").close()
    sft.main([*RUN, "--data", world, "--out", out])
    assert "removed what a killed save left" in capsys.readouterr().out
    assert _left_over(out) == ["run2.safetensors.tmp-99999"]
    assert _steps(out) == [3, 4]  # --keep 2, the default
    assert os.path.samefile(out, os.path.join(common.set_folder(out, 4), "model.safetensors"))  # a link, no copy
    assert_same_run(reference, out)
    # started over with --keep 1: the old run's sets go as the new one saves
    sft.main([*RUN, "--data", world, "--out", out, "--keep", "1", "--steps", "2"])
    assert "starting over" in capsys.readouterr().out
    assert _steps(out) == [2]


def test_keep_must_be_at_least_one(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sft.main([*RUN, "--data", world, "--out", str(tmp_path / "r.safetensors"), "--keep", "0"])
    assert e.value.code == 2 and "--keep: must be at least 1" in capsys.readouterr().err


def test_resume_passes_over_a_damaged_set_and_replaces_it(world, reference, tmp_path, capsys):
    out = str(tmp_path / "run.safetensors")
    sft.main([*RUN, "--data", world, "--out", out, "--stop-after", "3"])
    os.remove(os.path.join(common.set_folder(out, 3), "train.pt"))  # by hand, say
    capsys.readouterr()
    sft.main([*RUN, "--data", world, "--out", out, "--resume"])
    log = capsys.readouterr().out
    assert f"passing over {common.set_folder(out, 3)}: train.pt missing" in log and "at step 2" in log, log
    assert_same_run(reference, out)
    assert _steps(out) == [3, 4] and _left_over(out) == []


# -----------------------------------------------------------------------------
# what --resume continues: the flags


def _resume_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        sft.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_resume_refuses_flags_that_change_the_run(world, reference, tmp_path, capsys):
    out = str(tmp_path / "run.safetensors")
    sft.main([*RUN, "--data", world, "--out", out, "--stop-after", "2"])
    resume = [*RUN, "--data", world, "--out", out, "--resume"]
    err = _resume_error(capsys, [*resume, "--lr", "0.002", "--data", str(tmp_path)])
    assert err == (f"error: --resume: --data {world} -> {tmp_path}, --lr 0.003 -> 0.002: these change the run; "
                   f"pass --resume-override data,lr to continue anyway"), err
    for flag, value in (("--batch-size", "4"), ("--seed", "1"), ("--warmup", "2"), ("--weight-decay", "0"),
                        ("--stage", "rewarddance"), ("--micro-batch", "4"), ("--bf16", None)):
        err = _resume_error(capsys, [*resume, flag, *([value] if value else [])])
        assert err.startswith(f"error: --resume: {flag} ") and "this changes the run" in err, err
    # --steps below the saved step, a --stop-after already passed, an override that names no flag
    assert _resume_error(capsys, [*resume, "--steps", "1"]) == (
        f"error: --resume: {common.set_folder(out, 2)} is at step 2, past --steps 1: pass --steps 2 or more")
    assert "already past --stop-after 2" in _resume_error(capsys, [*resume, "--stop-after", "2"])
    assert "--lrr: not a flag of this script" in _resume_error(capsys, [*resume, "--resume-override", "lrr"])
    # when it evaluates, saves and keeps sets: allowed, said, and the run is the same run
    sft.main([*resume, "--eval-every", "1", "--eval-limit", "2", "--save-every", "2", "--keep", "3"])
    log = capsys.readouterr().out
    assert ("resume: --eval-every 0 -> 1, --eval-limit 4 -> 2, --save-every 1 -> 2, --stop-after 2 -> 0, --keep 2 -> 3 "
            "(when the run evaluates, saves or stops, not what it computes)") in log, log
    assert "step 3 | test" in log
    assert_same_run(reference, out)


def test_resume_override_continues_a_changed_run(world, tmp_path, capsys):
    out = str(tmp_path / "run.safetensors")
    sft.main([*RUN, "--data", world, "--out", out, "--stop-after", "2"])
    capsys.readouterr()
    sft.main([*RUN, "--data", world, "--out", out, "--resume", "--lr", "0.001", "--steps", "5",
              "--resume-override", "lr"])
    log = capsys.readouterr().out
    assert "resume: --lr 0.003 -> 0.001 (changes the run; --resume-override)" in log, log
    assert "resume: --steps 4 -> 5 (the lr schedule now ends at step 5)" in log, log
    assert _steps(out) == [4, 5]
    assert json.loads(common._checkpoint_meta(out)["args"])["lr"] == 0.001


def test_a_flag_the_checkpoint_did_not_record_counts_as_a_change():
    # allow-list: a flag added later is not harmless unless RESUME_HARMLESS says so
    saved = {"lr": 0.003, "steps": 4, "eval_every": 0}
    new = {"lr": 0.003, "steps": 8, "eval_every": 5, "new_knob": 1, "keep": 2}
    allowed, overridden, refused = common.resume_changes(saved, new)
    assert allowed == ["--steps 4 -> 8", "--eval-every 0 -> 5", "--keep (not recorded) -> 2"]
    assert overridden == [] and refused == ["--new-knob (not recorded) -> 1"]
    assert common.resume_changes(saved, new, {"new_knob"})[1:] == (["--new-knob (not recorded) -> 1"], [])
    assert common.resume_changes({**saved, "gone": 1}, saved)[2] == ["--gone 1 -> (none)"]
    # a flag added later (RESUME_ADDED) at the value that trains as before is no change; any other value is
    assert common.resume_changes(saved, {**saved, "train_only": ""}) == ([], [], [])
    assert common.resume_changes(saved, {**saved, "train_only": "mlp"})[2] == ["--train-only (not recorded) -> mlp"]
    assert common.resume_changes({**saved, "train_only": "mlp"}, {**saved, "train_only": ""})[2] == [
        "--train-only mlp -> "]
    assert common.override_keys(" --lr,batch-size,eval_every", {"lr", "batch_size", "eval_every"}) == {
        "lr", "batch_size", "eval_every"}


# -----------------------------------------------------------------------------
# gdso.py: three files per set (pi_ref too)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["ref", "pointer"])
def test_gdso_killed_at_a_save_resumes_to_the_same_run(world, tmp_path, point):
    args = ["--init", BASE, "--data", world, "--steps", "3", "--pairs", "2", "--group", "2", "--micro-pairs", "2",
            "--max-new-tokens", "24", "--eval-every", "0", "--eval-limit", "2", "--save-every", "1",
            "--beta", "0.1", "--ref-reset-every", "2"]
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    assert _run([*args, "--out", full], script="gdso.py").returncode == 0
    assert _run([*args, "--out", part], fault=f"{point}@2", script="gdso.py").returncode == -9
    res = _run([*args, "--out", part, "--resume"], script="gdso.py")
    assert res.returncode == 0 and f"at step {1 if point == 'ref' else 2}" in res.stdout, res.stderr[-2000:]
    assert_same_run(full, part)
    ra, rb = (load_file(os.path.join(common.newest_set(p), "ref.safetensors")) for p in (full, part))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_without_hard_links_the_pointer_is_a_relative_symbolic_link(tmp_path, monkeypatch):
    import tiny_world

    def no_links(*args):
        raise OSError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    path = str(tmp_path / "run.safetensors")
    model = tiny_world.tiny_score_model()
    opt = common.build_optimizer(model, 1e-3)
    for step in (1, 2, 3):
        common.save_checkpoint(path, model, opt, step=step)
    assert os.readlink(path) == os.path.join("run.ckpt", "step-00000003", "model.safetensors")
    assert _steps(path) == [2, 3] and _left_over(path) == []
    fresh = tiny_world.tiny_score_model(seed=1)
    assert common.load_resume(path, fresh, common.build_optimizer(fresh, 1e-3))[0] == 3


def test_an_old_style_pair_resumes_to_the_same_run(world, reference, tmp_path, capsys):
    # NAME.safetensors + NAME.train.pt, as runs wrote them before sets
    import shutil

    out = str(tmp_path / "run.safetensors")
    sft.main([*RUN, "--data", world, "--out", out, "--stop-after", "2"])
    shutil.copy(os.path.join(common.set_folder(out, 2), "train.pt"), common.train_path(out))
    os.remove(out)
    shutil.copy(os.path.join(common.set_folder(out, 2), "model.safetensors"), out)
    shutil.rmtree(common.sets_dir(out))
    capsys.readouterr()
    sft.main([*RUN, "--data", world, "--out", out, "--resume"])
    assert f"at step 2 (from the old-style pair {out} + {common.train_path(out)})" in capsys.readouterr().out
    assert_same_run(reference, out)
    assert not os.path.exists(common.train_path(out)) and _steps(out) == [3, 4]
