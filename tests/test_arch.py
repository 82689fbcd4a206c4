"""Model adapters: every supported architecture runs layer by layer exactly like the full transformers model
(the families of issue #17 included; their conversions: test_families.py), and converts end to end (tiny random
models; DeepSeek: dense first layer, shared experts, grouped routing)."""

from __future__ import annotations

import json

import pytest
import torch
from model_factory import ARCH_CONFIGS, EXPECTED_MOE_LAYERS, FAMILY_CONFIGS, moe_block

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.arch import detect
from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.converters.experts import load_expert_weights
from vllm_moe_lowrank.converters.runner import ExpertsProbe, LayerRunner
from vllm_moe_lowrank.converters.verify import verify_checkpoint


@pytest.fixture(scope="module", params=sorted(ARCH_CONFIGS))
def tiny(request, tiny_models):
    return request.param, tiny_models(request.param)


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS) + sorted(FAMILY_CONFIGS))
def test_layer_runner_matches_full_model(model_type, tiny_models):
    """Layer by layer the runner reproduces the full model, in eval mode (PhiMoE's sparsemixer router samples with
    jitter in training mode, so a runner left in training mode fails this); its probe sits where transformers keeps
    the experts and holds the checkpoint's experts; a released layer keeps nothing in memory."""
    from transformers import AutoModelForCausalLM

    path = tiny_models(model_type)
    ckpt = Checkpoint(path)
    arch = detect(ckpt.config)
    assert arch.moe_layers == EXPECTED_MOE_LAYERS[model_type]
    runner = LayerRunner(ckpt, arch)
    assert not any(m.training for m in runner.model.modules())
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden = [runner.embed(ids)]
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = full(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer (last is normed)
    seen = []
    for layer in range(arch.num_layers - 1):
        weights = load_expert_weights(ckpt, arch, layer) if layer in arch.moe_layers else None
        module, probe = runner.load_layer(layer, weights)
        if probe is not None:  # the probe sits where transformers keeps the experts (Granite: block_sparse_moe)
            assert module.get_submodule(arch.experts_module) is probe
            torch.testing.assert_close(  # and holds the checkpoint's experts, split from fused tensors on read
                probe.fn(0, hidden[0][0, :3]), moe_block(full, layer, model_type).experts(
                    hidden[0][0, :3], torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)), rtol=1e-5, atol=1e-5)
        hidden = runner.forward_layer(module, hidden)
        runner.release_layer(layer)
        # released means nothing of the layer stays in memory: no probe holding its experts, only meta tensors
        assert not any(isinstance(m, ExpertsProbe) for m in module.modules())
        assert all(t.is_meta for t in [*module.parameters(), *module.buffers()])
        torch.testing.assert_close(hidden[0], ref[layer + 1], rtol=1e-5, atol=1e-5)
        if probe is not None:
            calib = probe.calibration(arch.num_experts)
            assert calib.num_tokens == 48 and int(calib.counts().sum()) == 48 * arch.top_k
            seen.append(layer)
    assert seen == [l for l in arch.moe_layers if l < arch.num_layers - 1]


def test_converts_and_exports(tiny, tmp_path):
    model_type, path = tiny
    out = tmp_path / "out"
    cli.main(["--method", "svd", "--ratio", "0.3", str(path), str(out), "--calib-data", str(_calib(tmp_path)),
              "--num-samples", "4", "--seq-len", "32", "--export-dense", str(tmp_path / "dense")])
    cfg, counts = verify_checkpoint(out)
    assert abs(counts.achieved_ratio - 0.3) < 0.01
    assert cfg.moe_prefix == detect(json.loads((path / "config.json").read_text())).moe_prefix
    src, dst = Checkpoint(path), Checkpoint(out)
    shared = [n for n in src.tensors if "shared_expert" in n or "e_score_correction_bias" in n]
    assert bool(shared) == (model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    for n in shared:  # shared experts and routing biases are copied unchanged
        assert torch.equal(src.get(n), dst.get(n))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def _calib(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(("The quick brown fox jumps over the lazy dog. def main(): return 0\n" * 80))
    return f
