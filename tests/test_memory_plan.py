"""
memory_plan.py: the 27B and 9B recipes' per-rank bytes come from FSDP2 sharding of the published
configs on the meta device over a fake 8-rank process group (no weights, no GPU).

    python -m pytest tests/test_memory_plan.py -q
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_plan_shards_the_published_configs_eight_ways():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "memory_plan.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    # the model cards' sizes: 27B, and 9B (8.95B without the vision tower)
    sizes = {m: (float(a), float(b), float(c)) for m, a, b, c in re.findall(
        r"(Qwen/Qwen3\.5-\d+B): ([0-9.]+)B parameters \(([0-9.]+)B trainable.*rank 0 holds ([0-9.]+)B", out)}
    assert abs(sizes["Qwen/Qwen3.5-27B"][0] - 27.36) < 0.01 and abs(sizes["Qwen/Qwen3.5-9B"][1] - 8.95) < 0.01
    for total, _, local in sizes.values():
        assert 0.999 * total / 8 <= local < 1.01 * total / 8  # one eighth, plus FSDP2's padding of dim 0 (printed to 3 decimals)
    rows = [l for l in out.splitlines() if l.startswith("| ") and ".py" in l and l.count("|") > 10]  # the first table
    labels = [r.split(" | ")[0] for r in rows]
    assert labels[0] == "| sft.py 27B" and labels[-1] == "| risd.py 9B <- 27B" and "| gdso.py 27B" in labels
    for r in rows:  # every row sums its own columns: the state, plus the larger of the two backward phases
        cells = [c.strip() for c in r.strip("|").split("|")]
        v = [float(c) if c not in ("-", "host") else 0.0 for c in cells[2:11]]
        state, during, end = sum(v[:5]), sum(v[5:8]), v[8]
        assert abs(state + max(during, end) - float(cells[11])) < 0.3, r
    gdso = {r.split(" | ")[1]: [c.strip() for c in r.strip("|").split("|")] for r in rows if r.startswith("| gdso.py 27B |")}
    plain, chunked = gdso["`--micro-pairs 1 --group 8`"], gdso["`--micro-pairs 1 --group 8 --micro-samples 2`"]
    assert abs(float(chunked[9]) - float(plain[9]) * 2 / 16) < 0.1  # activations scale with the chunk: 2 of 16
    # without --offload the 27B rollout does not fit an 80 GB card at 8 ranks; with it, training and
    # rollout both do (the 4 GiB margin kept), and pi_ref is off the GPU through the updates
    assert "H100" not in chunked[-1]
    offload = gdso["`--micro-pairs 1 --group 8 --micro-samples 2 --offload`"]
    assert "H100 80 GB" in offload[-1] and offload[5] == "host"
    assert float(offload[11]) < float(chunked[11]) and float(offload[12]) < 79.1 - 4 < float(chunked[12])
    layerwise = gdso["`--micro-pairs 1 --group 8 --micro-samples 2 --offload --layerwise-rollout`"]
    assert float(layerwise[12]) < float(offload[12]) / 2
    # the host memory of a checkpoint: rank 0 held the 27B's model and AdamW state (> 300 GiB); sharded,
    # one tensor at a time
    host = [l for l in out.splitlines() if l.startswith("| gdso.py 27B | ") and l.count("|") == 6]
    before, _, now, _ = (float(c) for c in host[0].strip("|").split("|")[1:])
    assert before > 300 and now < 8
