"""
common.py's process exit: a torchrun worker leaves without the interpreter's teardown.
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
