"""The format module: metadata validation with actionable errors, exact tensor specs, materializer semantics."""

from __future__ import annotations

import random
import re

import pytest
import torch
from specs import CASES

from vllm_moe_lowrank.format import (FORMAT_VERSION, BaseTerm, DenseTerm, FormatError, LayerSpec, LowRankTerm,
                                     MoELowRankConfig, ProjSpec, ResidualTerm, UnitSplit, bucket_projection)
from vllm_moe_lowrank.materialize import materialize_projection

E, N, M = 4, 12, 10


def config(spec: LayerSpec, **kw) -> MoELowRankConfig:
    base = dict(format_version=FORMAT_VERSION, method=spec.method, num_experts=E, hidden_size=N,
                intermediate_size=M, moe_prefix="model.layers.{layer}.mlp.experts", moe_layers=[0, 1],
                layers={1: spec})
    return MoELowRankConfig(**{**base, **kw})


def random_tensors(cfg: MoELowRankConfig, layer: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in cfg.tensor_specs(layer).items():
        if s.dtype == "int32":
            hi = (max(cfg.layers[layer].proj(s.proj).residual.width, 1) if s.suffix == "res_bucket"
                  else cfg.intermediate_size)
            out[name] = torch.randint(0, hi, s.shape, generator=g, dtype=torch.int32)
        else:
            out[name] = torch.randn(s.shape, generator=g, dtype=torch.float64)
    return out


def lowrank(**kw) -> ProjSpec:
    return ProjSpec(lowrank=LowRankTerm(**kw))


def all_lowrank(ranks=(2, 3, 2, 1), **kw) -> LayerSpec:
    return LayerSpec(method="t", **{p: lowrank(ranks=list(ranks), **kw) for p in ("gate", "up", "down")})


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_materializes_with_exact_shapes(case):
    spec = CASES[case](E, M, random.Random(0), 4)
    cfg = config(spec)
    tensors = random_tensors(cfg)
    for e in range(E):
        for p in ("gate", "up", "down"):
            w = materialize_projection(cfg, 1, p, e, tensors.__getitem__)
            assert w.shape == ((N, M) if p == "down" else (M, N)) and torch.isfinite(w).all()


def test_per_expert_lowrank_is_u_times_v():
    cfg = config(all_lowrank())
    t = random_tensors(cfg)
    u, v = t[cfg.tensor_name(1, "up", "lr_u", 2)], t[cfg.tensor_name(1, "up", "lr_v", 2)]
    assert u.shape == (M, 2) and v.shape == (2, N)
    torch.testing.assert_close(materialize_projection(cfg, 1, "up", 2, t.__getitem__), u @ v)


def test_basis_mix_applies_act_in_weight_space():
    cfg = config(all_lowrank(ranks=(3, 3, 3, 3), num_bases=2, act="silu"))
    t = random_tensors(cfg)
    bases = t[cfg.tensor_name(1, "gate", "lr_v", None)]  # [2*3, N]
    assert bases.shape == (6, N) and t[cfg.tensor_name(1, "gate", "lr_mix", 1)].shape == (2,)
    mix = t[cfg.tensor_name(1, "gate", "lr_mix", 1)]
    expect = t[cfg.tensor_name(1, "gate", "lr_u", 1)] @ torch.nn.functional.silu(mix[0] * bases[:3] + mix[1] * bases[3:])
    torch.testing.assert_close(materialize_projection(cfg, 1, "gate", 1, t.__getitem__), expect)


def test_groups_and_slots_share_packed_factors():
    spec = all_lowrank(ranks=(2, 2, 3, 3), right_groups=[0, 0, 1, 1], left_slots=[0, 1, 2, 2])
    cfg = config(spec)
    specs = cfg.tensor_specs(1)
    assert specs[cfg.tensor_name(1, "gate", "lr_v", None)].shape == (5, N)  # groups: 2 + 3 rows
    assert specs[cfg.tensor_name(1, "gate", "lr_u", None)].shape == (M, 7)  # slots: 2 + 2 + 3 columns
    assert not any(s.expert is not None for s in specs.values())
    t = random_tensors(cfg)
    v, u = t[cfg.tensor_name(1, "gate", "lr_v", None)], t[cfg.tensor_name(1, "gate", "lr_u", None)]
    torch.testing.assert_close(materialize_projection(cfg, 1, "gate", 1, t.__getitem__), u[:, 2:4] @ v[:2])
    w2, w3 = (materialize_projection(cfg, 1, "gate", e, t.__getitem__) for e in (2, 3))
    torch.testing.assert_close(w2, u[:, 4:7] @ v[2:5])
    assert torch.equal(w2, w3)  # same slot and group: the same function


def test_bucket_projection_is_orthonormal():
    bucket = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    P = bucket_projection(bucket, 4)  # bucket 3 empty
    torch.testing.assert_close(P.T @ P, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)))


def test_units_place_exact_lowrank_and_base_in_compact_order():
    units = UnitSplit(exact=[2, 0, 3, 1], lowrank=[3, 4, 0, 2])
    gu = ProjSpec(dense=DenseTerm(units="exact"), lowrank=LowRankTerm(units="lowrank", ranks=[2, 2, 1, 1]))
    down = ProjSpec(dense=DenseTerm(units="exact"), lowrank=LowRankTerm(units="lowrank", ranks=[1, 2, 1, 1]),
                    base=BaseTerm(units="lowrank"))
    cfg = config(LayerSpec(method="rs-moe", units=units, gate=gu, up=gu, down=down))
    t = random_tensors(cfg)
    assert t[cfg.tensor_name(1, "gate", "weight", 0)].shape == (2, N)
    assert t[cfg.tensor_name(1, "down", "lr_v", 0)].shape == (1, 3)
    g0 = materialize_projection(cfg, 1, "gate", 0, t.__getitem__)
    torch.testing.assert_close(g0[:2], t[cfg.tensor_name(1, "gate", "weight", 0)])
    torch.testing.assert_close(g0[2:5], t[cfg.tensor_name(1, "gate", "lr_u", 0)] @ t[cfg.tensor_name(1, "gate",
                                                                                                    "lr_v", 0)])
    assert (g0[5:] == 0).all()  # pruned units
    d0 = materialize_projection(cfg, 1, "down", 0, t.__getitem__)
    B, idx = t[cfg.tensor_name(1, "down", "base", None)], t[cfg.tensor_name(1, "down", "base_idx", 0)].long()
    lr = t[cfg.tensor_name(1, "down", "lr_u", 0)] @ t[cfg.tensor_name(1, "down", "lr_v", 0)]
    torch.testing.assert_close(d0[:, 2:5], B[:, idx] + lr)


def test_residual_adds_eta_times_projection():
    spec = LayerSpec(method="rfid", gate=ProjSpec(lowrank=LowRankTerm(ranks=[1] * E),
                                                  residual=ResidualTerm(groups=[0, 1, 0, 1], width=3)),
                     up=lowrank(ranks=[1] * E), down=lowrank(ranks=[1] * E))
    cfg = config(spec)
    t = random_tensors(cfg)
    bucket = t[cfg.tensor_name(1, "gate", "res_bucket", None)]
    assert bucket.shape == (2, N)
    lr = t[cfg.tensor_name(1, "gate", "lr_u", 3)] @ t[cfg.tensor_name(1, "gate", "lr_v", 3)]
    res = t[cfg.tensor_name(1, "gate", "res_eta", 3)] @ bucket_projection(bucket[1], 3).T
    torch.testing.assert_close(materialize_projection(cfg, 1, "gate", 3, t.__getitem__), lr + res)


def test_mixtral_names():
    cfg = config(all_lowrank(), moe_prefix="model.layers.{layer}.block_sparse_moe.experts",
                 expert_names={"gate": "w1", "up": "w3", "down": "w2"})
    assert cfg.tensor_name(1, "up", "lr_u", 3) == "model.layers.1.block_sparse_moe.experts.3.w3.lr_u"
    assert cfg.tensor_name(1, "down", "base", None) == "model.layers.1.block_sparse_moe.experts.shared.w2.base"
    assert cfg.dense_layers() == [0] and len(cfg.dense_tensor_specs(0)) == 3 * E


@pytest.mark.parametrize("bad, message", [
    (dict(format_version=99), "format_version=99 is not supported"),
    (dict(layers={1: all_lowrank(ranks=(1, 2))}), "ranks has 2 entries, expected num_experts=4"),
    (dict(layers={1: all_lowrank(right_groups=[0, 0, 1, 1])}), "experts sharing entry 0 must have equal ranks"),
    (dict(layers={1: all_lowrank(ranks=(1, 1, 1, 1), right_groups=[0, 0, 2, 2])}), "must use ids 0..K-1"),
    (dict(layers={1: all_lowrank(ranks=(1, 2, 1, 1), num_bases=2)}), "a basis mix needs one rank"),
    (dict(layers={3: all_lowrank()}), "layer 3 is not in moe_layers"),
    (dict(moe_prefix="model.layers.mlp.experts"), "must contain '{layer}'"),
    (dict(layers={1: LayerSpec(method="t", gate=ProjSpec(), up=lowrank(ranks=[1] * 4),
                               down=lowrank(ranks=[1] * 4))}), "gate has no terms"),
    (dict(layers={1: LayerSpec(method="t", gate=ProjSpec(dense=DenseTerm(units="exact")), up=ProjSpec(dense=DenseTerm()),
                               down=ProjSpec(dense=DenseTerm()))}), "no units split"),
    (dict(layers={1: LayerSpec(method="t", units=UnitSplit(exact=[1] * 4, lowrank=[1] * 4),
                               gate=lowrank(ranks=[1] * 4, left_slots=[0] * 4), up=ProjSpec(dense=DenseTerm()),
                               down=ProjSpec(dense=DenseTerm()))}), "shares a factor along the unit axis"),
    (dict(layers={1: LayerSpec(method="t", units=UnitSplit(exact=[9] * 4, lowrank=[2] * 4),
                               gate=ProjSpec(dense=DenseTerm()), up=ProjSpec(dense=DenseTerm()),
                               down=ProjSpec(dense=DenseTerm()))}), "exceed intermediate_size=10"),
])
def test_invalid_metadata_is_refused_with_the_field(bad, message):
    with pytest.raises((FormatError, ValueError), match=re.escape(message)):
        config(all_lowrank(), **bad)


def test_missing_quantization_config():
    with pytest.raises(FormatError, match="no quantization_config"):
        MoELowRankConfig.from_hf_config({"model_type": "qwen3_moe"})
