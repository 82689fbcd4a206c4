"""The reference materializer of the ``moe_lowrank`` format: dense expert weights (float64) rebuilt from a
checkpoint's tensors, term by term, exactly as ``format.py`` defines them (FP8 tensors dequantized along their
version's scale axis). It is the definition the compute paths, the tests and the converter's reported errors are
checked against; nothing serves through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_moe_lowrank.format import PROJS, SCALE_SUFFIX, MoELowRankConfig, apply_act, bucket_projection
from vllm_moe_lowrank.rounding import dequantize, dequantize_blocks

Getter = Callable[[str], torch.Tensor]


def float_getter(cfg: MoELowRankConfig, get: Getter) -> Getter:
    """A getter that returns FP8 tensors dequantized (float32) with their ``*_scale`` along the axis of ``cfg``'s
    version; other tensors unchanged."""
    projs = {cfg.proj_name(p): p for p in PROJS}

    def fetch(name: str) -> torch.Tensor:
        t = get(name)
        if t.dtype == torch.float8_e4m3fn:  # name: <prefix>.<where>.<proj_name>.<suffix> (tensor_name)
            proj_name, suffix = name.rsplit(".", 2)[1:]
            return dequantize(t, get(name + SCALE_SUFFIX), torch.float32, cfg.scale_axis(projs[proj_name], suffix))
        return t

    return fetch


def _offset(sizes: list[int], k: int) -> int:
    return sum(sizes[:k])


def right_factor(cfg: MoELowRankConfig, layer: int, p: str, e: int, get: Getter) -> torch.Tensor:
    """R_e ``[r_e, in]`` of the low-rank term (act applied), float64."""
    lr = cfg.layers[layer].proj(p).lowrank
    r = lr.ranks[e]
    get = float_getter(cfg, get)
    if lr.num_bases is not None:
        bases = get(cfg.tensor_name(layer, p, "lr_v", None)).double()  # [J*r, in]
        mix = get(cfg.tensor_name(layer, p, "lr_mix", e)).double()  # [J]
        v = torch.einsum("j,jri->ri", mix, bases.view(lr.num_bases, r, -1))  # [r, in]
    elif lr.right_groups is not None:
        g = lr.right_groups[e]
        off = _offset(lr.group_ranks(), g)
        v = get(cfg.tensor_name(layer, p, "lr_v", None)).double()[off:off + r]  # [r, in]
    else:
        v = get(cfg.tensor_name(layer, p, "lr_v", e)).double()  # [r, in]
    return apply_act(lr.act, v)


def left_factor(cfg: MoELowRankConfig, layer: int, p: str, e: int, get: Getter) -> torch.Tensor:
    """L_e ``[out, r_e]`` of the low-rank term, float64."""
    lr = cfg.layers[layer].proj(p).lowrank
    get = float_getter(cfg, get)
    if lr.left_slots is not None:
        s = lr.left_slots[e]
        off = _offset(lr.slot_ranks(), s)
        return get(cfg.tensor_name(layer, p, "lr_u", None)).double()[:, off:off + lr.ranks[e]]  # [out, r]
    return get(cfg.tensor_name(layer, p, "lr_u", e)).double()  # [out, r]


def dense_weight(cfg: MoELowRankConfig, layer: int, p: str, e: int, get: Getter,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of projection p of expert e of a layer left dense (``dense_quantization``: dequantized)."""
    w = get(cfg.tensor_name(layer, p, "weight", e))
    q = cfg.dense_quantization
    if q is None or w.dtype != torch.float8_e4m3fn:
        return w.to(dtype)
    return dequantize_blocks(w, get(cfg.tensor_name(layer, p, q.scale_suffix, e)), q.weight_block_size, dtype)


def materialize_projection(cfg: MoELowRankConfig, layer: int, p: str, e: int, get: Getter) -> torch.Tensor:
    """Dense weight of projection p of expert e in float64, in compact unit order padded with zeros to m units.

    gate/up: ``[m, n]``; down: ``[n, m]``. Pruned units are zero rows (gate/up) / columns (down), which leaves
    the expert's function unchanged because silu(0)·0 = 0.
    """
    if layer not in cfg.layers:
        return dense_weight(cfg, layer, p, e, get, torch.float64)
    ps = cfg.layers[layer].proj(p)
    get = float_getter(cfg, get)
    n, m = cfg.hidden_size, cfg.intermediate_size
    full = torch.zeros((n, m) if p == "down" else (m, n), dtype=torch.float64)
    # compact unit order of this expert: [exact | lowrank]; "all" spans both (or all m without a units split)
    ex = cfg.unit_count(layer, e, "exact") if cfg.layers[layer].units is not None else 0
    starts = {"all": 0, "exact": 0, "lowrank": ex}

    def place(seg: str, w: torch.Tensor) -> None:
        s, k = starts[seg], cfg.unit_count(layer, e, seg)
        if p == "down":
            full[:, s:s + k] += w
        else:
            full[s:s + k, :] += w

    if ps.dense is not None:
        place(ps.dense.units, get(cfg.tensor_name(layer, p, "weight", e)).double())
    if ps.lowrank is not None:
        place(ps.lowrank.units, left_factor(cfg, layer, p, e, get) @ right_factor(cfg, layer, p, e, get))
    if (res := ps.residual) is not None:
        g = res.groups[e]
        P = bucket_projection(get(cfg.tensor_name(layer, p, "res_bucket", None))[g], res.width)  # [in, s]
        place("all", get(cfg.tensor_name(layer, p, "res_eta", e)).double() @ P.T)
    if (base := ps.base) is not None:
        B = get(cfg.tensor_name(layer, p, "base", None)).double()  # [n, m]
        if base.units == "lowrank":
            place("lowrank", B[:, get(cfg.tensor_name(layer, p, "base_idx", e)).long()])
        else:
            place("all", B)
    return full


def materialize_expert(cfg: MoELowRankConfig, layer: int, e: int, get: Getter) -> dict[str, torch.Tensor]:
    """{gate: [m, n], up: [m, n], down: [n, m]} of expert e, float64."""
    return {p: materialize_projection(cfg, layer, p, e, get) for p in PROJS}
