"""Offline ``LLM(...)`` on every checkpoint case: greedy tokens equal transformers on the dense export, and the
loaded experts hold exactly the compressed tensors (no dense copies).

One engine per case (module fixture). The ``svd`` engine runs in compiled mode (torch.compile through the custom
op); the others use enforce_eager. No ``quantization=`` argument: the method is detected from config.json.
"""

from __future__ import annotations

import gc
import math

import pytest

import vllm_probe
from vllm_cases import ALL_CASES, MAX_TOKENS

pytestmark = pytest.mark.vllm
COMPILED = {"svd"}  # the one compiled-mode engine of the suite


def make_llm(model, **kw):
    from vllm import LLM

    return LLM(model=str(model), dtype="float32", max_model_len=512, seed=0, **kw)


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def greedy(llm, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module", params=ALL_CASES)
def engine(request, checkpoints, hf_refs):
    name = request.param
    comp, _ = checkpoints(name)
    hf_refs(name)  # transformers runs before the engine starts (memory, CPU)
    llm = make_llm(comp, enforce_eager=name not in COMPILED)
    yield name, llm
    shutdown(llm)


def test_greedy_matches_transformers(engine, hf_refs):
    name, llm = engine
    ref = hf_refs(name)
    got = greedy(llm, ref["prompts"])
    assert got == ref["tokens"], f"{name}: vLLM {got} != transformers {ref['tokens']}"
    # one prompt alone (batch composition must not matter)
    assert greedy(llm, ref["prompts"][:1]) == ref["tokens"][:1]


def test_experts_store_only_compressed_tensors(engine, checkpoints):
    """Every compressed layer's parameters are exactly its checkpoint tensors (same bytes, packed), nothing dense."""
    from vllm_moe_lowrank.converters.checkpoint import Checkpoint
    from vllm_moe_lowrank.format import MoELowRankConfig
    from vllm_moe_lowrank.kernels import buffer_name

    name, llm = engine
    comp, _ = checkpoints(name)
    cfg = MoELowRankConfig.from_hf_config(Checkpoint(comp).config)
    mem = llm.apply_model(vllm_probe.expert_memory)[0]  # one result per worker
    assert len(mem) == len(cfg.moe_layers)
    for layer in cfg.moe_layers:
        info = next(v for k, v in mem.items() if f"layers.{layer}." in k)
        if layer not in cfg.layers:
            assert info["method"] == "UnquantizedFusedMoEMethod"
            continue
        assert info["method"] == "MoELowRankMoEMethod"
        specs = cfg.tensor_specs(layer).values()
        # float32 model: 4 bytes per element; FP8 factors are dequantized at load on CPU (to float32 here), their
        # float32 scales stay
        expected = sum(math.prod(ts.shape) * 4 if ts.dtype == "fp8" else ts.nbytes(4) for ts in specs)
        stored = sum(b for _, b in info["params"].values())
        assert stored == expected, f"{name} layer {layer}: {stored} parameter bytes, the checkpoint has {expected}"
        assert set(info["params"]) == {buffer_name(ts.proj, ts.suffix, ts.expert) for ts in specs}
        derived = sum(b for n, b in info["buffers"].items() if n.startswith("moe_lowrank_"))
        assert derived < 0.02 * stored  # the routing table and bucket scales only
