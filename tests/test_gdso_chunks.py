"""
Tests of gdso.py --micro-samples S: a micro-batch's forward and backward in chunks of S samples
give the gradient, the logged terms and the weights of one forward of all 2 x pairs x G samples
(S = 0), for GDSO (whose L_pw couples the samples: two passes) and for GRPO; the batch rows a
chunk reads (pixel_values by its images' patches); inner step 0's ratio pi_theta / pi_old
exactly 1 with pi_old scored in eval mode, in chunks or not; and a 2-rank torchrun run in chunks
against one process without.

Not bitwise: a chunk's matmuls run on fewer rows (another blocking) and its gradient is added to
the others' in .grad, so the sums run in another order. The gradients agree to ~1e-6 of their
largest entry (fp32 rounding over a few hundred terms); the tests allow 1e-5.

    python -m pytest tests/test_gdso_chunks.py -q            # in-process, ~25 s on 2 busy cores
    python -m pytest tests/test_gdso_chunks.py -q -m slow    # the torchrun run too
"""

import copy

import pytest
import torch

import common
import gdso
from conftest import assert_same_update
from test_gdso import BASE, COMMON, _run, needs_base
from test_train_loop import Probe

pytestmark = needs_base
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's matmuls are too small for two threads; on 2 shared cores they spin-wait (10x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(world, *extra):
    # 2 micro-batches of 2 pairs: N = 2 x 2 x G(4) = 16 samples each, S = 3 leaves a last chunk of 1;
    # G = 4 because at G = 2 the tiny base's first rollouts tie within every group (no advantage)
    return gdso.get_args([*COMMON, "--data", world, "--group", "4", "--micro-pairs", "2", "--beta", "0.05", *extra])


@pytest.fixture(scope="module")
def start(world):
    """The policy, pi_ref and one step's sampled rollouts (scored and rewarded as main does)."""
    torch.manual_seed(0)
    args = _args(world)
    train, test, batches = gdso.load_data(args, 0, 1)
    policy, ref, _ = gdso.load_models(args, CPU, train, test)
    rollouts = gdso.sample(policy, batches.next(), 2, args, 0, 0, CPU)
    gdso.score(policy, ref, rollouts, 1.0)
    valid = torch.cat([r.valid for r in rollouts])
    assert valid.any() and not valid.all(), "want valid and malformed traces both"
    gdso.reward(rollouts, common.unwrap(policy), args)
    assert min(float(r.advantages.abs().max()) for r in rollouts) > 0.05, "a micro-batch without policy gradient"
    return args, policy, ref, rollouts


class Capture:
    """An optimizer that keeps the (clipped) gradients update() hands it instead of stepping."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{}], None

    def step(self):
        self.grads = [p.grad.clone() for p in self.model.parameters() if p.grad is not None]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


def _one_update(world, start, flags, S):
    args = _args(world, *flags, "--micro-samples", str(S))
    _, policy, _, rollouts = start
    gdso.reward(rollouts, common.unwrap(policy), args)
    n_valid = sum(float(r.valid.sum()) for r in rollouts) / len(rollouts)
    opt = Capture(policy)
    logs = gdso.update(policy, opt, rollouts, args, 0, 1, n_valid, 1.0)
    return logs, opt.grads


@pytest.mark.parametrize("flags", [[], ["--no-full-vocab-ce"], ["--method", "grpo"]],
                         ids=["gdso", "gdso-bins-ce", "grpo"])
def test_chunks_give_the_unchunked_gradient_and_logs(world, start, flags):
    want_logs, want = _one_update(world, start, flags, 0)
    assert want_logs["l_pw"] > 0 if "grpo" not in flags else want_logs["l_pw"] == 0
    scale = max(float(g.abs().max()) for g in want)
    # 3: chunks of 3, 3, 3, 3, 3, 1 (the bins-only CE differs in L_pt alone: one S is enough)
    for S in (1, 2, 3) if "--no-full-vocab-ce" not in flags else (3,):
        logs, got = _one_update(world, start, flags, S)
        assert len(got) == len(want)
        err = max(float((a - b).abs().max()) for a, b in zip(got, want))
        assert err <= 1e-5 * scale, (S, err, scale)
        for name, value in want_logs.items():
            assert abs(logs[name] - value) <= 1e-5 * max(1.0, abs(value)), (S, name, logs[name], value)


def test_chunks_give_the_same_weights_after_a_few_updates(world, start):
    # three AdamW updates on the same rollouts (pi_theta moves away from pi_old: the ratio and the
    # clip are live from the second on)
    _, policy0, _, rollouts = start
    outs = {}
    for S in (0, 3):
        args = _args(world, "--micro-samples", str(S))
        policy = copy.deepcopy(policy0)
        gdso.reward(rollouts, common.unwrap(policy), args)
        optimizer = common.build_optimizer(policy, args.lr, args.weight_decay)
        n_valid = sum(float(r.valid.sum()) for r in rollouts) / len(rollouts)
        for k in range(3):
            gdso.update(policy, optimizer, rollouts, args, 0, k, n_valid, 1.0)
        outs[S] = {n: p.detach().clone() for n, p in policy.named_parameters()}
    base = dict(policy0.named_parameters())
    moved = torch.cat([(outs[0][n] - base[n]).abs().flatten() for n in base])
    diff = torch.cat([(outs[3][n] - outs[0][n]).abs().flatten() for n in base])
    assert moved.mean() > 1e-5
    assert diff.mean() < 1e-3 * moved.mean(), (diff.mean(), moved.mean())


@pytest.mark.parametrize("S", [0, 3])
def test_inner_step_0_ratio_is_exactly_1(world, start, S):
    # pi_old scored in eval mode, the update's forward in train mode, both in the same chunks. (On
    # the CPU a row's result does not depend on how many rows share its matmuls, so scoring in one
    # forward would pass here too; on a GPU the kernel depends on the shape: score() chunks alike.)
    args = _args(world, "--micro-samples", str(S))
    _, policy0, ref, rollouts = start
    policy = copy.deepcopy(policy0)
    rollouts = [copy.copy(r) for r in rollouts]
    gdso.score(policy, ref, rollouts, 1.0, S)
    assert not policy.training
    gdso.reward(rollouts, common.unwrap(policy), args)
    logs = gdso.update(policy, Capture(policy), rollouts, args, 0, 0, 1.0, 1.0)
    assert policy.training
    assert logs["kl_old"] == 0.0 and logs["clip"] == 0.0


def test_chunks_go_forward_and_backward_one_at_a_time(world, tmp_path, monkeypatch):
    # main with --checkpointing, 2 micro-batches of N = 4 in chunks of 3 + 1: each chunk's backward
    # (the recompute) comes before the next chunk's forward, so only one chunk's activations live;
    # gradients are reduced once per update; pi_old, pi_ref and the updates all in chunks at T
    probe = Probe(monkeypatch)
    gdso.main([*COMMON, "--data", world, "--out", str(tmp_path / "g.safetensors"), "--steps", "1", "--pairs", "2",
               "--micro-pairs", "1", "--eval-every", "0", "--eval-limit", "2", "--checkpointing", "--beta", "0.1",
               "--temperature", "0.5", "--micro-samples", "3"])
    probe.check_checkpointing()
    assert probe.calls == [("forward", True), ("recompute", True)] * 2 * 2 * 2  # K x micro-batches x chunks
    assert probe.syncs == [False, False, False, True] * 2
    assert len(probe.temperatures) == 2 * 2 * 2 + 2 * 2 * 2 and set(probe.temperatures) == {0.5}


def test_batch_rows_slices_images_by_their_patches():
    # images of different sizes: a chunk's pixel_values are its own images' patches, as encoding it alone gives
    from PIL import Image

    model = common.load_model(BASE)
    images = [Image.new("RGB", size, color) for size, color in
              [((32, 32), "red"), ((64, 32), "green"), ((32, 96), "blue"), ((64, 64), "white")]]
    prompts = ["a red square", "a long green prompt with more words", "blue", "white"]
    batch = model.encode(prompts, images, "alignment", "reasoning", completions=[[1, 2], [3], [4, 5, 6], [7]])
    assert len(set(batch["image_grid_thw"].prod(-1).tolist())) > 1
    rows = slice(1, 3)
    part = gdso.batch_rows(batch, rows)
    alone = model.encode(prompts[rows], images[rows], "alignment", "reasoning")
    assert torch.equal(part["pixel_values"], alone["pixel_values"])
    assert torch.equal(part["image_grid_thw"], alone["image_grid_thw"])
    assert torch.equal(part["input_ids"], batch["input_ids"][rows]) and part["prompt_len"] == batch["prompt_len"]
    # and the model reads the rows as it reads them in the whole batch
    idx = torch.full((4,), batch["prompt_len"] - 1)
    with torch.no_grad():
        whole, some = model(batch, idx)["score_logits"], model(part, idx[rows])["score_logits"]
    torch.testing.assert_close(some, whole[rows], rtol=1e-5, atol=1e-5)
    assert gdso.row_chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert gdso.row_chunks(8, 0) == gdso.row_chunks(8, 8) == [slice(None)]


def test_micro_samples_must_not_be_negative(capsys):
    with pytest.raises(SystemExit) as e:
        gdso.get_args(["--micro-samples", "-1"])
    assert e.value.code == 2 and "--micro-samples" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_in_chunks_match_one_process_without(world, tmp_path, fsdp):
    # 2 ranks x 2 micro-batches of one pair (N = 4 samples) in chunks of 3 (3 + 1, after the no-grad
    # pass of L_pw) against one process with 4 micro-batches in one forward each (test_gdso's run)
    args = [*COMMON, "--data", world, "--steps", "2", "--save-every", "2", "--temperature", "1", "--beta", "0.05",
            "--micro-pairs", "1"]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    _run([*args, "--out", one])
    _run([*args, "--out", two, "--micro-samples", "3"] + (["--fsdp"] if fsdp else []), nproc=2)
    assert_same_update(one, two, BASE, min_moved=1e-4)
