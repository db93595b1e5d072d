"""
What every training loop must do from its first step, checked by running each script in-process
for one step on the tiny model and watching it: the policy trains in train mode, so that
--checkpointing recomputes the decoder layers in the backward; sft runs forward and backward per
micro-batch; gradients are reduced on the last micro-batch only; every recomputed log-prob is at
the sampling temperature; and --bf16 is bf16 compute on fp32 master weights, so a step at lr 1e-6
moves every weight that the fp32 step moves.

    python -m pytest tests/test_train_loop.py -q
"""

import os
import runpy
import sys

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

import common
import tiny_world
from model import ScoreModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
GEN = os.path.join(ROOT, "assets", "tiny_gen.safetensors")
pytestmark = pytest.mark.skipif(not (os.path.exists(BASE) and os.path.exists(GEN)), reason="tiny assets not built")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=8, seed=0)
    return str(out)


class Probe:
    """Records, while a script runs: calls of the first trained layer's MLP with grad on (in a
    forward, or recomputed inside the backward) with its train flag; the temperature of every
    token log-prob forward; the sync flag of every micro-batch. (The MLP, not the decoder layer:
    transformers checkpoints a layer only through its own forward, which a patch would replace.)"""

    def __init__(self, monkeypatch, layer_cls=qwen.Qwen3_5MLP):
        self.calls, self.temperatures, self.syncs, self.first = [], [], [], None
        layer_forward, model_forward, grad_sync = layer_cls.forward, ScoreModel.forward, getattr(common, "grad_sync", None)

        def layer(mod, *args, **kwargs):
            if torch.is_grad_enabled() and any(p.requires_grad for p in mod.parameters()):
                self.first = self.first or id(mod)
                if id(mod) == self.first:
                    in_backward = torch._C._current_graph_task_id() != -1
                    self.calls.append(("recompute" if in_backward else "forward", mod.training))
            return layer_forward(mod, *args, **kwargs)

        def model(mod, batch, score_index, targets=None, temperature=1.0, **kwargs):
            if targets is not None:
                self.temperatures.append(temperature)
            return model_forward(mod, batch, score_index, targets=targets, temperature=temperature, **kwargs)

        def sync(m, on):
            self.syncs.append(bool(on))
            return grad_sync(m, on)

        monkeypatch.setattr(layer_cls, "forward", layer)
        monkeypatch.setattr(ScoreModel, "forward", model)
        if grad_sync is not None:
            monkeypatch.setattr(common, "grad_sync", sync)

    def check_checkpointing(self):
        forwards = [c for c in self.calls if c[0] == "forward"]
        assert forwards and all(training for _, training in forwards), "a training forward ran in eval mode"
        assert any(kind == "recompute" for kind, _ in self.calls), "--checkpointing recomputed nothing in the backward"


def _sft(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")


def test_sft_checkpoints_and_runs_forward_backward_per_micro_batch(world, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    _sft(monkeypatch, ["--init", BASE, "--data", world, "--out", str(tmp_path / "s.safetensors"), "--steps", "1",
                       "--batch-size", "12", "--micro-batch", "4", "--eval-every", "0", "--eval-limit", "4",
                       "--checkpointing"])
    probe.check_checkpointing()
    # three micro-batches: each one's backward (the recompute) comes before the next one's forward
    assert [kind for kind, _ in probe.calls] == ["forward", "recompute"] * 3, probe.calls
    assert probe.syncs == [False, False, True]


def test_gdso_checkpoints_syncs_once_and_recomputes_at_the_sampling_temperature(world, tmp_path, monkeypatch, capsys):
    import re

    import gdso

    probe = Probe(monkeypatch)
    gdso.main(["--init", BASE, "--data", world, "--out", str(tmp_path / "g.safetensors"), "--steps", "1",
               "--pairs", "2", "--group", "2", "--micro-pairs", "1", "--max-new-tokens", "40", "--eval-every", "0",
               "--eval-limit", "2", "--checkpointing", "--temperature", "0.5", "--beta", "0.1", "--lr", "1e-3", "--warmup", "2"])
    probe.check_checkpointing()
    assert probe.syncs == [False, True] * 2  # K = 2 inner steps of 2 micro-batches
    # pi_old, pi_ref and the two updates: every token log-prob at T = 0.5
    assert len(probe.temperatures) == 2 * 2 + 2 * 2 and set(probe.temperatures) == {0.5}, probe.temperatures
    # the log shows, per inner step: the clipped fraction, the KL to pi_old and that step's lr
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("step    1 |"))
    clip, kl_old, lr = re.search(r"clip ([0-9.]+/[0-9.]+) \| kl_old ([-+0-9.e]+/[-+0-9.e]+) \| lr ([-+0-9.e]+/[-+0-9.e]+)",
                                 line).groups()
    assert float(clip.split("/")[0]) == 0 and float(kl_old.split("/")[0]) == 0  # inner step 0: pi = pi_old
    assert float(kl_old.split("/")[1]) > 0 and len(set(lr.split("/"))) == 2  # step 1 moved; warmup raised the lr


def test_risd_checkpoints_and_syncs_once(world, tmp_path, monkeypatch):
    import risd

    probe = Probe(monkeypatch)
    risd.main(["--teacher", BASE, "--student", BASE, "--data", world, "--out", str(tmp_path / "r.safetensors"),
               "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--max-new-tokens", "16",
               "--eval-every", "0", "--eval-limit", "2", "--checkpointing"])
    probe.check_checkpointing()
    assert probe.syncs == [False, True]


def test_opd_checkpoints_and_recomputes_at_the_sampling_temperature(world, tmp_path, monkeypatch):
    import risd

    probe = Probe(monkeypatch)
    risd.main(["--opd", "--teacher", BASE, "--student", BASE, "--data", world, "--out", str(tmp_path / "o.safetensors"),
               "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--max-new-tokens", "16",
               "--eval-every", "0", "--eval-limit", "2", "--checkpointing", "--temperature", "0.5"])
    probe.check_checkpointing()
    assert probe.syncs == [False, True]
    # teacher and student, two micro-batches each: A_t = log pi_T - log pi_old at the student's T
    assert len(probe.temperatures) == 4 and set(probe.temperatures) == {0.5}, probe.temperatures


def test_reward_ft_checkpoints_and_syncs_once(world, tmp_path, monkeypatch):
    import reward_ft

    probe = Probe(monkeypatch, layer_cls=tiny_world.Block)
    reward_ft.main(["--reward", BASE, "--init", GEN, "--data", world, "--out", str(tmp_path / "gen.safetensors"),
                    "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--eval-prompts", "1",
                    "--eval-samples", "1", "--grid-prompts", "1", "--bf16"])
    probe.check_checkpointing()
    assert probe.syncs == [False, True]


def _trainable(path, base):
    from safetensors.torch import load_file

    w = load_file(path)
    return torch.cat([w[k].float().flatten() - base[k].float().flatten() for k in sorted(w) if ".visual." not in k])


def test_bf16_is_compute_only_a_step_at_lr_1e_6_moves_the_weights(world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base = load_file(BASE)
    lr = 1e-6
    deltas = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        out = str(tmp_path / f"{name}.safetensors")
        _sft(monkeypatch, ["--init", BASE, "--data", world, "--out", out, "--steps", "1", "--batch-size", "8",
                           "--micro-batch", "8", "--lr", str(lr), "--warmup", "1", "--eval-every", "0",
                           "--eval-limit", "4", "--weight-decay", "0", *extra])
        assert load_file(out)[sorted(base)[0]].dtype == torch.float32, "fp32 master weights are saved"
        deltas[name] = _trainable(out, base)
    moved = deltas["fp32"].abs() > 0.5 * lr  # AdamW's first step moves each weight with a gradient by ~lr
    assert moved.float().mean() > 0.2, "the fp32 step moved too few weights to compare"
    # bf16 compute moves the same weights, the same way: only where the gradient is ~0 may the
    # sign of bf16's rounding-level gradient differ
    d16, d32 = deltas["bf16"][moved], deltas["fp32"][moved]
    assert (d16.abs() > 0.5 * lr).float().mean() > 0.99
    assert (torch.sign(d16) == torch.sign(d32)).float().mean() > 0.97
    assert (d16 - d32).abs().mean() < 0.1 * lr
