"""
Tests of checkpoint sets under FSDP2 (issue 30): every rank writes and reads its own shards of the
weights, AdamW's state and pi_ref (torch.distributed.checkpoint in the set's shards/), no process
gathers them, and model.safetensors is streamed one tensor at a time. On 2 gloo ranks: a resume
is bit-exact against the uninterrupted run, a kill in the middle of a save loses nothing, each rank
reads only its own shard file, and a sharded set is refused without --fsdp in one line.

    python -m pytest tests/test_sharded_checkpoints.py -q        # ~2 min on 2 cores
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import model as model_lib
from conftest import ROOT, run_script
from test_gdso import BASE, _run, needs_base

pytestmark = needs_base


def test_streamed_checkpoint_is_the_file_write_checkpoint_writes(tmp_path):
    tensors = {"b.weight": torch.randn(3, 4), "a.ids": torch.arange(5), "c.half": torch.randn(2, 2).bfloat16(),
               "d.empty": torch.ones(0)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    w = model_lib.StreamedCheckpoint(tmp_path / "s.safetensors", specs, {"step": 3})
    for k in sorted(tensors):
        w.add(k, tensors[k])
    w.close()
    model_lib.write_checkpoint(tmp_path / "w.safetensors", tensors, {"step": 3})
    meta, got = model_lib.read_checkpoint(tmp_path / "s.safetensors")  # verifies the checksum
    assert meta == model_lib.read_checkpoint(tmp_path / "w.safetensors")[0]
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert not any(n.startswith("s.safetensors.tmp") for n in os.listdir(tmp_path))


def test_streamed_checkpoint_refuses_tensors_out_of_order_or_missing(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    w = model_lib.StreamedCheckpoint(tmp_path / "s.safetensors", specs, {})
    with pytest.raises(ValueError, match="expected tensor a"):
        w.add("b", torch.zeros(3))
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors were not written"):
        w.close()
    assert not (tmp_path / "s.safetensors").exists()


RUN = ["--init", BASE, "--pairs", "4", "--group", "2", "--max-new-tokens", "40", "--eval-every", "0", "--eval-limit", "8",
       "--lr", "1e-3", "--warmup", "1", "--steps", "2", "--beta", "0.05", "--ref-reset-every", "1", "--micro-pairs", "1",
       "--fsdp"]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "full.safetensors")
    _run([*RUN, "--data", world, "--out", out, "--save-every", "2"], nproc=2)
    return out


@pytest.fixture(scope="module")
def stopped(world, tmp_path_factory):
    """A run stopped after its step-1 set (read, not changed, by the tests that use it)."""
    out = str(tmp_path_factory.mktemp("stopped") / "run.safetensors")
    args = [*RUN, "--data", world, "--out", out, "--save-every", "2", "--stop-after", "1"]
    _run(args, nproc=2)
    return out, args


def _differ(one, two):
    a, b = load_file(one), load_file(two)
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_a_sharded_set_resumes_bit_exact(world, uninterrupted, stopped, tmp_path):
    import shutil

    part = str(tmp_path / "part.safetensors")  # a copy of the stopped run, which other tests read
    shutil.copytree(common.sets_dir(stopped[0]), common.sets_dir(part))
    shutil.copy(stopped[0], part)
    folder = common.newest_set(part)
    shards = sorted(os.listdir(os.path.join(folder, "shards")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    train = torch.load(os.path.join(folder, "train.pt"), weights_only=False)
    assert train["format"] == "shards" and "optimizer" not in train and len(train["rng"]) == 2
    assert not os.path.exists(os.path.join(folder, "ref.safetensors"))  # pi_ref is in the shards
    model_lib.verify_checksum(os.path.join(folder, "model.safetensors"))
    out = _run([*RUN, "--data", world, "--out", part, "--save-every", "2", "--resume"], nproc=2)
    assert "resumed" in out and "step-00000001" in out
    assert _differ(uninterrupted, part) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shards", "model"])
def test_a_kill_during_a_sharded_save_loses_nothing(world, uninterrupted, tmp_path, point):
    # saves at steps 1 and 2; rank 0 dies by SIGKILL in step 2's save, after `point`; the resume
    # continues from step 1's set and ends where the uninterrupted run does
    out = str(tmp_path / "killed.safetensors")
    args = [*RUN, "--data", world, "--out", out, "--save-every", "1"]
    res = run_script("gdso.py", args, nproc=2, env_extra={"ZR_FAULT_AFTER": f"{point}@2"}, check=False)
    assert res.returncode != 0
    assert [os.path.basename(f) for f in common.committed_sets(out)] == ["step-00000001"]
    log = _run([*args, "--resume"], nproc=2)
    assert "removed what a killed save left" in log and "step-00000001" in log
    assert _differ(uninterrupted, out) == []


PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed.checkpoint.filesystem as fs
import common, gdso

reads = []
original = fs.FileSystemReader.read_data
def read_data(self, plan, planner):
    for item in plan.items:
        info = self.storage_data[item.storage_index]
        reads.append([info.relative_path, info.length, item.dest_index.fqn])
    return original(self, plan, planner)
fs.FileSystemReader.read_data = read_data

args = gdso.get_args(sys.argv[3:])
rank, world, device = common.dist_init()
train, test, batches = gdso.load_data(args, rank, world)
policy, ref, optimizer = gdso.load_models(args, device, train, test)
step = common.resume_step(args, policy, optimizer, batches, frozen=ref)
with open(f"{sys.argv[2]}/reads-{rank}.json", "w") as f:
    json.dump({"step": step, "reads": reads}, f)
common.dist_cleanup()
common.exit_worker()  # as every script ends under torchrun (its docstring says why)
'''


@pytest.mark.slow
def test_each_rank_reads_only_its_own_shards(stopped, tmp_path):
    out, args = stopped
    folder = common.newest_set(out)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_script(script, [ROOT, tmp_path, *args, "--stop-after", "0", "--resume"], nproc=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"reads-{rank}.json").read_text())
        assert got["step"] == 1
        own = f"__{rank}_0.distcp"
        mine = [(n, fqn) for path, n, fqn in got["reads"] if path == own]
        other = [(n, fqn) for path, n, fqn in got["reads"] if path != own]
        # weights, AdamW moments and pi_ref: its own slices, from its own file
        assert {fqn.split(".")[0] for _, fqn in mine} == {"model", "optim", "ref"}
        assert sum(n for n, _ in mine) <= os.path.getsize(os.path.join(folder, "shards", own))
        # from another rank's file only what every rank holds whole, each saved once: AdamW's step
        # counts and its hyperparameters (~1.5 KB each as torch.save writes them)
        assert all(fqn.startswith("optim.param_groups.") or fqn.startswith("optim.state.") and fqn.endswith(".step")
                   for _, fqn in other), [fqn for _, fqn in other][:3]
        assert sum(n for n, _ in other) < 0.05 * sum(n for n, _ in mine)


@pytest.mark.slow
def test_a_sharded_set_without_fsdp_is_refused_in_one_line(stopped):
    out, args = stopped
    no_fsdp = [a for a in args if a != "--fsdp"]
    res = run_script("gdso.py", [*no_fsdp, "--stop-after", "0", "--resume", "--resume-override", "fsdp"], nproc=2,
                     check=False)
    assert res.returncode != 0
    assert "was saved sharded (--fsdp, 2 ranks); resume it with --fsdp on 2 ranks" in res.stderr + res.stdout
    assert "]: Traceback" not in res.stderr  # no worker's ("[rank0]: Traceback"); torchrun prints its own
