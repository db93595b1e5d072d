"""
--train-only REGEX (common.freeze): sft.py, risd.py and gdso.py train only the parameters whose names
match, and leave every other weight exactly as loaded. In the tiny world this is how the one-token
student keeps its alignment reading through SFT and RISD (docs/LOG.md, 2026-12-07); at real scale it
picks layers or modules to train. The refusals (a pattern that does not compile, one that matches
nothing trainable) are in tests/test_user_errors.py.
"""

import os
import re

from safetensors.torch import load_file

from conftest import ROOT, run_script

ASSETS = os.path.join(ROOT, "assets")
TOP_MLP = r"layers\.1\.mlp|language_model\.norm"


def assert_only_matching_moved(start, end, pattern):
    """Every tensor whose name matches `pattern` is in both files; the matching ones moved, the others
    are bit-identical."""
    a, b = load_file(start), load_file(end)
    assert set(a) == set(b)
    # the files store the score model's state under the vlm's own names; the flag sees "vlm." in front
    matching = [k for k in a if re.search(pattern, "vlm." + k)]
    assert matching and len(matching) < len(a)
    for k in a:
        if k in matching:
            assert not (a[k] == b[k]).all(), f"{k} matches --train-only and did not move"
        else:
            assert (a[k] == b[k]).all(), f"{k} does not match --train-only and moved"


def test_sft_trains_only_the_matching_parameters(world, tmp_path):
    start, end = os.path.join(ASSETS, "tiny_student_base.safetensors"), tmp_path / "sft.safetensors"
    res = run_script("sft.py", ["--init", start, "--data", world, "--out", end, "--steps", 3, "--batch-size", 8,
                                "--micro-batch", 8, "--eval-every", 0, "--eval-limit", 8, "--train-only", TOP_MLP])
    assert re.search(r"--train-only .*: 4 of \d+ tensors trainable", res.stdout), res.stdout[-2000:]
    assert_only_matching_moved(start, str(end), TOP_MLP)


def test_risd_trains_only_the_matching_parameters_of_the_student(world, tmp_path):
    start, end = os.path.join(ASSETS, "tiny_student_base.safetensors"), tmp_path / "risd.safetensors"
    run_script("risd.py", ["--teacher", os.path.join(ASSETS, "tiny_teacher.safetensors"), "--student", start,
                           "--data", world, "--out", end, "--steps", 2, "--batch-size", 8, "--micro-batch", 8,
                           "--limit", 16, "--teacher-temperature", 0, "--eval-every", 0, "--eval-limit", 8,
                           "--train-only", TOP_MLP])
    assert_only_matching_moved(start, str(end), TOP_MLP)


def test_gdso_trains_only_the_matching_parameters_of_the_policy(world, tmp_path):
    start, end = os.path.join(ASSETS, "tiny_base.safetensors"), tmp_path / "gdso.safetensors"
    pattern = r"layers\.1\."
    run_script("gdso.py", ["--init", start, "--data", world, "--out", end, "--steps", 1, "--pairs", 2,
                           "--eval-every", 0, "--eval-limit", 8, "--train-only", pattern])
    assert_only_matching_moved(start, str(end), pattern)
