"""Tensor parallelism (TP=2) and expert parallelism (EP=2) are token-exact against transformers.

TP=2 runs the units/base/residual/basis-mix checkpoint (ragged unit splits, narrowed bases and buckets); EP=2 the
slots/groups/basis-mix/residual one (local experts, shared tensors on every rank). Each runs in a fresh process
with the 2-rank CPU settings (one OMP thread per rank, no reserved core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
RUN = Path(__file__).with_name("vllm_run.py")


def run_parallel(model: Path, prompts: list[list[int]], *args: str) -> list[list[int]]:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    r = subprocess.run([sys.executable, str(RUN), str(model), json.dumps(prompts), *args], env=env,
                       capture_output=True, text=True, timeout=900)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM run failed ({r.returncode}):\n{r.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("case,args", [("synth-units", ["--tp", "2"]), ("synth-shared", ["--tp", "2", "--ep"])],
                         ids=["tp2", "ep2"])
def test_parallel_matches_transformers(case, args, checkpoints, hf_refs):
    comp, _ = checkpoints(case)
    ref = hf_refs(case)
    assert run_parallel(comp, ref["prompts"], *args) == ref["tokens"]
