"""
Sharded loading (--fsdp) of every listed model family: a tiny random Qwen3.5, Qwen3-VL and
Qwen2.5-VL, each written by transformers' save_pretrained into a Hugging Face folder, built on the
meta device, sharded with FSDP2 over a simulated 2-rank process group and filled from the folder's
files, equal, shard by shard, to the unsharded from_pretrained load. Qwen2.5-VL is the case that
needs the model's own key mapping: transformers writes it in a legacy layout (`model.embed_tokens`,
`visual.*`) that from_pretrained renames on load.

    python -m pytest tests/test_families_sharded.py -q          (about 15 s)
"""

import os
import subprocess
import sys

import torch

from conftest import qwen2_5_vl, qwen3_vl
from tiny_world import build_tiny_tokenizer, tiny_image_processor, tiny_score_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# rank 1 of 2 (fake process group): every parameter's shard equals its rows of the unsharded load
SCRIPT = """
import sys, torch, torch.distributed as dist
import common
from model import ScoreModel
from torch.testing._internal.distributed.fake_pg import FakeStore
folders = sys.argv[1:]
full = {f: dict(ScoreModel.from_pretrained(f).vlm.named_parameters()) for f in folders}
dist.init_process_group('fake', store=FakeStore(), rank=1, world_size=2)
for f in folders:
    m = common.wrap(common.load_model(f, meta=True), torch.device('cpu'), fsdp=True)
    n = 0
    for name, p in m.vlm.named_parameters():
        shard = p.to_local()
        start = (p.shape[0] + 1) // 2
        assert torch.equal(shard, full[f][name][start:start + shard.shape[0]].detach()), (f, name)
        n += 1
    print('OK', type(m.vlm).__name__, n)
dist.destroy_process_group()
"""


def test_every_family_loads_sharded_equal_to_an_unsharded_load(tmp_path):
    tok = build_tiny_tokenizer()
    folders = []
    for name, build in (("qwen3_5", lambda: tiny_score_model(seed=3).vlm), ("qwen3_vl", lambda: qwen3_vl(tok)),
                        ("qwen2_5_vl", lambda: qwen2_5_vl(tok))):
        torch.manual_seed(0)
        folder = tmp_path / name
        for part in (build(), tok, tiny_image_processor()):
            part.save_pretrained(folder)
        folders.append(str(folder))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", SCRIPT, *folders], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    done = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("OK")]
    assert done == ["Qwen3_5ForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                    "Qwen2_5_VLForConditionalGeneration"], res.stdout
