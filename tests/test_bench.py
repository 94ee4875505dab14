"""The benchmark's memory probe: a process tree's proportional set size includes its children."""

import os
import subprocess
import sys
import time

from experiments.bench import _tree_pss

HOLD = "import sys, time; x = bytearray(b'1') * (200 * 2**20); print('ready', flush=True); time.sleep(60)"


def _tree_pss_kb(root: int) -> int:
    return sum(_tree_pss(root).values())


def test_the_memory_of_a_process_tree_includes_its_children():
    before = _tree_pss_kb(os.getpid())
    assert before > 10_000  # this interpreter with torch imported holds far more than 10 MB
    child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        assert _tree_pss_kb(os.getpid()) - before > 150_000  # the child's 200 MB
        assert _tree_pss_kb(child.pid) > 150_000
    finally:
        child.kill()
        child.wait()
