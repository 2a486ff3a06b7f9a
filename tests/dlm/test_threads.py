"""dlm.threads: after `confine_to_engines`, torch runs one thread everywhere but in the threads that
claimed the engines' share (an engine's worker, `in_engine_thread`). Process-wide state, so the
checks run in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SCRIPT = r"""
import threading, torch
from dlm import threads
assert threads.engine_threads() is None
threads.claim_for_engine()  # before confining: nothing changes
base = torch.get_num_threads()
threads.confine_to_engines(3)
threads.confine_to_engines(5)  # once only
assert threads.engine_threads() == 3, threads.engine_threads()
assert torch.get_num_threads() == 1
seen = {}
def plain():
    seen["plain"] = torch.get_num_threads()
t = threading.Thread(target=plain); t.start(); t.join()
seen["claimed"] = threads.in_engine_thread(torch.get_num_threads)
try:
    threads.in_engine_thread(lambda: 1 / 0)
except ZeroDivisionError:
    seen["raised"] = True
from dlm.ar import AREngine
from dlm.engine import GenerationParams
import sys
sys.path.insert(0, "tests/dlm")
from dlm_tiny_models import random_loaded
loaded = random_loaded("causal", seed=0, eos=[1], block_size=1)
loaded.model.register_forward_pre_hook(lambda module, args: seen.setdefault("worker", torch.get_num_threads()))
with AREngine(loaded, max_batch_size=1) as engine:
    engine.submit([2, 3], GenerationParams(max_new_tokens=2)).result()
assert torch.get_num_threads() == 1
print(seen["plain"], seen["claimed"], seen.get("raised"), seen["worker"])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp: Linux builds of torch")
def test_only_engine_threads_get_more_than_one_thread():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "3", "True", "3"]  # plain thread, claimed, error passed on, engine worker


def test_the_command_confines_threads_before_anything_else():
    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["voice-agent"] == "voice_agent.cli:run"
    assert "run()" in (root / "voice_agent" / "__main__.py").read_text()
