"""The plugin's config, weight mapper, loaders and completeness check, without starting an engine.

A small stand-in for vLLM's RoutedExperts layer drives create_weights / the weight loaders /
process_weights_after_loading as vLLM does (global expert ids, unsharded tensors, one call per tensor).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from specs import CASES
from test_kernels import make_cfg, random_tensors, reference, routing
from vllm_moe_lowrank.format import FormatError

pytestmark = pytest.mark.vllm


class FakeExperts(torch.nn.Module):
    """What MoELowRankMoEMethod uses of RoutedExperts."""

    def __init__(self, E, n, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1):
        super().__init__()
        self.layer_name = "model.layers.1.mlp.experts"
        self.global_num_experts = E
        self.apply_router_weight_on_input = False
        lo, hi = ep_rank * E // ep_size, (ep_rank + 1) * E // ep_size
        self.local = list(range(lo, hi))
        self.moe_config = SimpleNamespace(is_act_and_mul=True, activation=SimpleNamespace(value="silu"),
                                          hidden_dim=n, tp_rank=tp_rank, tp_size=tp_size)

    def _map_global_expert_id_to_local_expert_id(self, g):
        return self.local.index(g) if g in self.local else -1


def shard_of(ts):
    return {"gate": "w1", "up": "w3", "down": "w2"}[ts.proj]


def load_like_vllm(method, layer, cfg, tensors, skip=()):
    """Route each checkpoint tensor through the config's weight mapper and the parameter's loader."""
    from vllm_moe_lowrank.plugin.config import MoELowRankQuantConfig

    mapper = MoELowRankQuantConfig(cfg).get_checkpoint_weight_mapper()
    for name, t in tensors.items():
        if name in skip:
            continue
        mapped = mapper.map_name(mapper.map_name(name))  # applied twice by nested loaders: idempotent
        rest = mapped.removeprefix(cfg.prefix(1) + ".")
        expert, proj, suffix = rest.split(".")
        side = "w2" if proj == "down_proj" else "w13"
        param = getattr(layer, f"{side}_{suffix}")
        shard = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        param.weight_loader(param, t, mapped, shard_id=shard, expert_id=int(expert), return_success=True)


def build(case="mixed", tp=(0, 1), ep=(0, 1), skip=()):
    from vllm_moe_lowrank.plugin.method import MoELowRankMoEMethod

    cfg = make_cfg(case)
    tensors = random_tensors(cfg)
    layer = FakeExperts(cfg.num_experts, cfg.hidden_size, *tp, *ep)
    method = MoELowRankMoEMethod(cfg, 1, None)
    method.create_weights(layer, len(layer.local), cfg.hidden_size, cfg.intermediate_size, torch.float64)
    load_like_vllm(method, layer, cfg, tensors, skip)
    return cfg, tensors, layer, method


@pytest.mark.parametrize("case", sorted(CASES))
def test_loaded_layer_computes_reference_under_tp_and_ep(case):
    x, w, ids = routing()
    cfg, tensors, *_ = build(case)
    want = reference(cfg, tensors, x, w, ids)
    total = torch.zeros_like(want)
    for tp, ep in [((0, 2), (0, 1)), ((1, 2), (0, 1))]:
        _, _, layer, method = build(case, tp, ep)
        method.process_weights_after_loading(layer)
        total += method.apply(layer, x, w, ids)
    torch.testing.assert_close(total, want, rtol=1e-9, atol=1e-9)
    total = torch.zeros_like(want)
    for ep in [(0, 2), (1, 2)]:
        _, _, layer, method = build(case, (0, 1), ep)
        method.process_weights_after_loading(layer)
        total += method.apply(layer, x, w, ids)
    torch.testing.assert_close(total, want, rtol=1e-9, atol=1e-9)


def test_missing_tensor_stops_loading_with_its_name():
    cfg = make_cfg("mixed")
    name = cfg.tensor_name(1, "down", "base", None)
    _, _, layer, method = build("mixed", skip={name})
    with pytest.raises(FormatError, match=rf"never loaded: '{name}'"):
        method.process_weights_after_loading(layer)


def test_misshaped_or_undeclared_tensor_is_refused():
    cfg, tensors, layer, method = build("svd")
    bad = tensors[cfg.tensor_name(1, "up", "lr_u", 2)][:, :-1]
    with pytest.raises(FormatError, match=r"up_proj\.lr_u' has shape"):
        layer.w13_lr_u.weight_loader(layer.w13_lr_u, bad, "x", shard_id="w3", expert_id=2)
    with pytest.raises(FormatError, match="does not exist"):  # an expert index beyond num_experts
        layer.w13_lr_u.weight_loader(layer.w13_lr_u, bad, "x", shard_id="w3", expert_id=99)
    cfg, tensors, layer, method = build("mobe")  # gate/up have lr_mix, down has none: w2_lr_mix absent
    assert not hasattr(layer, "w2_lr_mix")
    cfg, tensors, layer, method = build("mixed")  # gate has a residual (so w13_res_eta exists), up has none
    with pytest.raises(FormatError, match="unexpected checkpoint tensor"):
        layer.w13_res_eta.weight_loader(layer.w13_res_eta, torch.zeros(1), "x", shard_id="w3", expert_id=0)


def test_ep_rank_skips_other_experts():
    cfg, tensors, layer, method = build("svd", ep=(1, 2))
    t = tensors[cfg.tensor_name(1, "gate", "lr_u", 0)]
    assert layer.w13_lr_u.weight_loader(layer.w13_lr_u, t, "x", shard_id="w1", expert_id=0,
                                        return_success=True) is False


def test_mapper_routes_shared_tensors_idempotently():
    from vllm_moe_lowrank.plugin.config import MoELowRankQuantConfig

    m = MoELowRankQuantConfig(make_cfg("moe_svd")).get_checkpoint_weight_mapper()
    name = "model.layers.1.mlp.experts.shared.down_proj.lr_v"
    once = m.map_name(name)
    assert once == "model.layers.1.mlp.experts.0.down_proj.shared_lr_v" == m.map_name(once)
    assert m.map_name("model.layers.1.mlp.experts.3.up_proj.lr_u") == "model.layers.1.mlp.experts.3.up_proj.lr_u"
    assert m.map_name("model.layers.1.mlp.shared_experts.gate_proj.weight").endswith("shared_experts.gate_proj.weight")


def test_from_config_errors_are_actionable():
    from vllm_moe_lowrank.plugin.config import MoELowRankQuantConfig

    qc = make_cfg("svd").model_dump(mode="json")
    assert MoELowRankQuantConfig.from_config(qc).get_name() == "moe_lowrank"
    with pytest.raises(FormatError, match="format_version=99 is not supported.*re-convert"):
        MoELowRankQuantConfig.from_config({**qc, "format_version": 99})
    v1 = {k: v for k, v in qc.items() if k not in ("factor_dtype", "linear_quantization")}
    assert MoELowRankQuantConfig.from_config({**v1, "format_version": 1}).fmt.format_version == 1  # still read
    with pytest.raises(FormatError, match="num_experts"):
        MoELowRankQuantConfig.from_config({k: v for k, v in qc.items() if k != "num_experts"})
    bad = {**qc, "layers": {"1": {**qc["layers"]["1"], "gate": {"lowrank": {"ranks": [1, 2]}}}}}
    with pytest.raises(FormatError, match=r"gate\.lowrank\.ranks has 2 entries"):
        MoELowRankQuantConfig.from_config(bad)
    with pytest.raises(FormatError, match="no quantization_config"):
        MoELowRankQuantConfig()


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import vllm_moe_lowrank

    vllm_moe_lowrank.register()
    vllm_moe_lowrank.register()
    assert QUANTIZATION_METHODS.count("moe_lowrank") == 1
    assert get_quantization_config("moe_lowrank").__name__ == "MoELowRankQuantConfig"


def test_quant_method_per_layer_kind():
    from vllm_moe_lowrank.plugin.config import MoELowRankQuantConfig

    qc = MoELowRankQuantConfig(make_cfg("svd"))
    assert qc.layer_index("model.layers.1.mlp.experts") == 1
    assert qc.layer_index("model.layers.12.block_sparse_moe.experts") == 12
    assert qc.get_quant_method(torch.nn.Linear(2, 2), "lm_head") is None

