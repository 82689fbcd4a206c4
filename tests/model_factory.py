"""Tiny random MoE checkpoints of every supported architecture, for tests (nothing is fetched from a hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3-moe-pydocs"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 4096  # the fixture tokenizer's

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=512, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
               pad_token_id=0, tie_word_embeddings=False)
ARCH_CONFIGS = {
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=4, mlp_only_layers=[2]),
    "qwen2_moe": dict(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=4),
    "mixtral": dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4),
    "olmoe": dict(num_key_value_heads=4, intermediate_size=32, num_experts=4),
    "deepseek_v2": dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5),
}
# families added for issue #17 (tests/test_families.py); kept apart so test_arch's per-family expectations stay its
# own. The three served by vLLM there use head_dim 32 (vLLM's CPU attention has no head_dim 16 kernel).
FAMILY_CONFIGS = {
    "glm4_moe": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, intermediate_size=96,
                     moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=1, topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True),
    "ernie4_5_moe": dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=96,
                         moe_intermediate_size=32, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                         moe_layer_start_index=1),
    "phimoe": dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                   router_jitter_noise=0.01, attention_bias=True, lm_head_bias=True),  # as Phi-3.5-MoE
    "minimax_m2": dict(num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4),
    "qwen3_next": dict(num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, num_experts=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "granitemoe": dict(num_key_value_heads=2, intermediate_size=24, num_local_experts=4, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=6.0),
}


# the MoE layers ``arch.detect`` must find in each tiny model above (DeepSeek, GLM-4.5, ERNIE-4.5: dense first layer)
EXPECTED_MOE_LAYERS = {"qwen3_moe": (0, 1), "qwen2_moe": (0, 1, 2), "mixtral": (0, 1, 2), "olmoe": (0, 1, 2),
                       "deepseek_v2": (1, 2), "deepseek_v3": (1, 2), "glm4_moe": (1, 2), "ernie4_5_moe": (1, 2),
                       "phimoe": (0, 1, 2), "minimax_m2": (0, 1, 2), "qwen3_next": (0, 1, 2), "granitemoe": (0, 1, 2)}

# architectures the released checkpoints name where transformers' class name differs (vLLM resolves by it)
RELEASED_ARCHITECTURES = {"phimoe": "PhiMoEForCausalLM"}


def moe_block(model, layer: int, model_type: str):
    """transformers' MoE block of a decoder layer (through the family's in-memory name)."""
    from vllm_moe_lowrank.converters.arch import FAMILIES

    fam = FAMILIES[model_type]
    return model.model.layers[layer].get_submodule(fam.module_block or fam.block)


def make_tiny_model(model_type: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``model_type`` with the fixture's tokenizer; returns its folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**_COMMON, **(ARCH_CONFIGS.get(model_type) or FAMILY_CONFIGS[model_type]), **overrides}
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than init std so that experts differ visibly and routing spreads
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.08)
            if "e_score_correction_bias" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    if model_type in RELEASED_ARCHITECTURES:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "architectures": [RELEASED_ARCHITECTURES[model_type]]}))
    for f in TOKENIZER_FILES:
        shutil.copy(FIXTURE / f, out / f)
    return out


def split_into_shards(src: Path, dst: Path, per_shard: int = 60) -> Path:
    """Copy a single-file checkpoint as an indexed multi-shard checkpoint."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(0, len(names), per_shard):
        file = f"model-{i // per_shard + 1:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i:i + per_shard]}, dst / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names[i:i + per_shard]})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def fuse_experts(src: Path, dst: Path) -> Path:
    """Copy a per-expert checkpoint with each layer's experts stored as fused 3-D tensors
    ``experts.gate_up_proj [E, 2m, n]`` and ``experts.down_proj [E, n, m]`` (the transformers ≥ 5 layout)."""
    import re

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, by_proj in experts.items():
        stack = {p: torch.stack([by_proj[p][e] for e in sorted(by_proj[p])]) for p in by_proj}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"{prefix}.down_proj"] = stack["down_proj"]
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst
