"""
common.py: a torchrun worker exits without the interpreter's teardown; wrap's mixed precision and sync;
sharded loading; dist_init's attention backend on a GPU.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# prints without a newline into a pipe (block-buffered), so only an explicit flush gets it out
SCRIPT = ("import atexit, common; atexit.register(print, ' teardown', end=''); print('done', end=''); "
          "common.exit_worker(); print(' returned', end='')")


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PYTHONUNBUFFERED")}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**env, **env_extra},
                         capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout


def test_a_torchrun_worker_exits_flushed_and_without_teardown():
    # under torchrun the backend's threads may outlive destroy_process_group(); the worker must not
    # reach interpreter finalization, yet nothing it printed may be lost
    assert _run({"RANK": "0", "WORLD_SIZE": "1"}) == (0, "done")


def test_one_process_returns_and_exits_normally():
    assert _run({}) == (0, "done returned teardown")


# wrap under a one-rank process group: mixed precision and gradient sync, for FSDP2 and DDP
WRAP_SCRIPT = """
import torch, common, data
from PIL import Image
import tiny_world
from model import ScoreModel
from tiny_world import make_world
rank, world, device = common.dist_init(timeout_s=60)
make_world(WORLD, n=4, seed=0)
recs = data.load_jsonl(WORLD + '/train.jsonl')[:4]
ims = [Image.open(r['image_path']).convert('RGB') for r in recs]
def loss_of(w, sl):
    b = common.unwrap(w).encode([r['prompt'] for r in recs[sl]], ims[sl], [r['dimension'] for r in recs[sl]], 'direct')
    return w(b, torch.full((len(recs[sl]),), b['prompt_len'] - 1))['score_logits'].logsumexp(-1).sum()
for fsdp in (True, False):
    m = tiny_world.tiny_score_model().to(torch.bfloat16)  # a bf16 checkpoint: wrap makes fp32 master weights of it
    m.vision_tower().requires_grad_(False)
    w = common.wrap(m, device, fsdp=fsdp, bf16=True)
    seen = []
    m.vlm.model.language_model.layers[0].mlp.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    with common.grad_sync(w, False):
        loss_of(w, slice(0, 2)).backward()
        inside = getattr(w, 'require_backward_grad_sync', None)
    local = sum(p.grad is not None for p in w.parameters())
    with common.grad_sync(w, True):
        loss_of(w, slice(2, 4)).backward()
    print('RESULT', fsdp, {str(p.dtype) for p in w.parameters()}, sorted({str(d) for d in seen}), inside, local,
          sum(p.grad is not None for p in w.parameters()) > 0, w.training)
common.dist_cleanup()
"""


def test_wrap_keeps_fp32_master_weights_computes_in_bf16_and_syncs_on_the_last_micro_batch(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env = {**{k: v for k, v in os.environ.items() if k not in env}, **env}
    res = subprocess.run([sys.executable, "-c", f"WORLD = {str(tmp_path / 'w')!r}\n" + WRAP_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = [l.split(" ", 2)[1:] for l in res.stdout.splitlines() if l.startswith("RESULT")]
    fsdp, ddp = (l[1] for l in lines)
    params, compute = "{'torch.float32'}", "['torch.bfloat16']"
    # FSDP2: fp32 shards, bf16 compute; every micro-batch reduce-scatters into the sharded
    # gradients (accumulating unsharded gradients would hold a full fp32 gradient per rank)
    assert fsdp.startswith(f"{params} {compute} None ") and not fsdp.startswith(f"{params} {compute} None 0 "), fsdp
    assert fsdp.endswith(" True True"), fsdp
    # DDP: fp32 parameters, the body under autocast; no all-reduce inside no_sync
    assert ddp.startswith(f"{params} {compute} False "), ddp
    assert ddp.endswith(" True True"), ddp


# loading at scale: an 8-rank FSDP2 sharding simulated on one CPU (fake process group), rank 3
META_SCRIPT = """
import tiny_world
import torch, torch.distributed as dist, common
from torch.testing._internal.distributed.fake_pg import FakeStore
from model import ScoreModel
import tempfile
folder = tempfile.mkdtemp()  # an HF folder, written before the process group (save_pretrained writes on rank 0 only)
src = tiny_world.tiny_score_model(seed=3)
for part in (src.vlm, src.tokenizer, src.image_processor):
    part.save_pretrained(folder)
dist.init_process_group('fake', store=FakeStore(), rank=3, world_size=8)
full = ScoreModel.load(BASE)
for frozen in (False, True):
    m = common.load_model(BASE, meta=True)
    assert all(p.device.type == 'meta' for p in m.parameters())
    if frozen:
        m = common.wrap_frozen(m, torch.device('cpu'), fsdp=True, bf16=True)
    else:
        m.vision_tower().requires_grad_(False)
        m = common.wrap(m, torch.device('cpu'), fsdp=True, bf16=True)
    ref = dict(full.vlm.named_parameters())
    local = 0
    for name, p in m.vlm.named_parameters():
        shard = p.to_local()
        rows = shard.shape[0]
        start = 3 * ((p.shape[0] + 7) // 8)
        want = ref[name][start:start + rows].to(shard.dtype)
        assert torch.equal(shard, want), name
        local += shard.numel()
    assert torch.equal(m.bin_ids, full.bin_ids)
    rot = [b for n, b in m.named_buffers() if n.endswith('inv_freq')]
    assert rot and all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in rot)
    print('RESULT', frozen, {str(p.dtype) for p in m.parameters()}, local, sum(p.numel() for p in full.vlm.parameters()))
# an HF folder (config, tokenizer, image processor, model.safetensors) goes the same way
m = common.wrap(common.load_model(folder, meta=True), torch.device('cpu'), fsdp=True)
ref = dict(src.vlm.named_parameters())
for name, p in m.vlm.named_parameters():
    shard = p.to_local()
    start = 3 * ((p.shape[0] + 7) // 8)
    assert torch.equal(shard, ref[name][start:start + shard.shape[0]].detach()), name
print('HF ok')
dist.destroy_process_group()
"""


def test_meta_build_then_each_rank_fills_only_its_shard_from_the_file():
    base = os.path.join(ROOT, "assets", "tiny_base.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", f"BASE = {base!r}\n" + META_SCRIPT], cwd=ROOT,
                         env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "HF ok" in res.stdout
    lines = [l.split(" ", 2)[1:] for l in res.stdout.splitlines() if l.startswith("RESULT")]
    (policy, p_rest), (frozen, f_rest) = lines
    assert p_rest.startswith("{'torch.float32'}") and f_rest.startswith("{'torch.bfloat16'}")
    for rest in (p_rest, f_rest):
        local, total = map(int, rest.split("} ")[1].split())
        assert local < total / 8 * 1.2, (local, total)  # rank 3 holds about an eighth of every tensor


def test_on_a_gpu_dist_init_turns_off_cudnn_attention(monkeypatch):
    # cuDNN's attention backward gave NaN gradients on an H200 (common.dist_init says where); every
    # script gets its device from dist_init, so that is where the backend goes off
    import torch

    import common

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert common.dist_init() == (0, 1, torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
