"""DeepSeek-V2/V3 (MLA, grouped routing, shared experts, routed scaling) checked at the MoE-layer level.

vLLM's CPU MLA attention is not deterministic across runs, so end-to-end tokens cannot be compared; instead
every MoE block's input and output are recorded inside vLLM during generation, and the output is compared to
transformers' MoE block of the dense export in float64 on the same input. A tiny random model is converted
with ``moe-convert --method svd``. (MLA on CPU needs kv_lora_rank + qk_rope_head_dim = 576.)
"""

from __future__ import annotations

import json

import pytest
import torch

import vllm_probe
from model_factory import make_tiny_model
from vllm_cases import convert

pytestmark = pytest.mark.vllm
MLA_CPU = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16, num_experts_per_tok=2,
               n_routed_experts=8, max_position_embeddings=512)
# real DeepSeek-V3 configs carry these; vLLM reads them (HF's V3 code always routes this way)
V3_ROUTING = dict(topk_method="noaux_tc", scoring_func="sigmoid")


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_moe_layers_match_float64_reference(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    from test_vllm_offline import make_llm, shutdown

    routing = V3_ROUTING if model_type == "deepseek_v3" else {}
    src = make_tiny_model(model_type, tmp_path / "src", **MLA_CPU, **routing)
    comp, dense = tmp_path / "comp", tmp_path / "dense"
    convert(src, comp, ["--method", "svd", "--ratio", "0.3"], dense)

    moe_layers = json.loads((comp / "config.json").read_text())["quantization_config"]["moe_layers"]
    llm = make_llm(comp, enforce_eager=True)
    try:
        assert llm.apply_model(vllm_probe.install_moe_hooks)[0] == len(moe_layers)  # layer 0 is dense
        llm.generate(["def f(x):", "import numpy as np\n"], _greedy(8))
        records = llm.apply_model(vllm_probe.captured)[0]
    finally:
        shutdown(llm)
    assert {layer for layer, _, _ in records} == set(moe_layers)

    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float64, experts_implementation="eager")
    worst = 0.0
    with torch.no_grad():
        for layer, x, y in records:
            x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)  # [T, n]
            out = hf.model.layers[layer].mlp(x[None])
            ref = (out[0] if isinstance(out, tuple) else out)[0]  # [T, n]
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-4, f"{model_type}: MoE output differs from the float64 reference by {worst:.2e} (relative)"


def _greedy(n):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)
