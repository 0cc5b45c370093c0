"""``benchmarks/gpu.py``: without a CUDA device it exits 0 and says so; its checks run on any device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_without_a_gpu_it_exits_0_with_a_clear_message():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "no CUDA device: benchmarks/gpu.py checks nothing here (run it on a GPU machine, or pass --device cpu)")
