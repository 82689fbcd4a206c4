"""Synthetic moe_lowrank checkpoints built from a real model, covering every term kind of the format.

Each compressed layer gets a spec from ``specs.CASES`` and factors fitted to the layer's real expert weights
(SVDs and least squares), so the model still generates sensibly; layers not listed stay dense. Tensors are named
and shaped by format.py and written in float32; ``export_dense`` gives the matching dense reference.

    python tests/synth.py SRC OUT --layers 0=moe_svd,1=mobe,3=rfid [--dense-out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from specs import CASES
from vllm_moe_lowrank.converters.arch import detect
from vllm_moe_lowrank.converters.checkpoint import Checkpoint, copy_aux_files
from vllm_moe_lowrank.converters.experts import expert_tensor_names, load_expert_weights
from vllm_moe_lowrank.converters.export_dense import export_dense
from vllm_moe_lowrank.converters.verify import verify_checkpoint
from vllm_moe_lowrank.format import (PROJS, LayerSpec, MoELowRankConfig, apply_act,
                                     bucket_projection)

Tensors = dict[tuple[str, str, int | None], torch.Tensor]  # (proj, suffix, expert or None) -> tensor


def _top_right(w: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors of w as rows [r, in] (orthonormal; random rows beyond w's rank)."""
    _, vecs = torch.linalg.eigh(w.T @ w)  # ascending eigenvalues of the Gram [in, in]
    vh = vecs.flip(1).T  # [in, in], rows by decreasing singular value
    if r > vh.shape[0]:
        vh = torch.cat([vh, torch.randn(r - vh.shape[0], vh.shape[1], dtype=vh.dtype) / vh.shape[1] ** 0.5])
    return vh[:r]


def _stored(v: torch.Tensor, act: str) -> torch.Tensor:
    """A stored right factor whose act() is a well-conditioned version of v."""
    return v if act == "identity" else 4.0 * v * v.shape[1] ** 0.5 / v.norm(dim=1, keepdim=True).clamp(min=1e-9)


def _lstsq_left(targets: list[torch.Tensor], rights: list[torch.Tensor]) -> torch.Tensor:
    """argmin_L Σ ‖T_i − L·R_i‖² = (Σ T_i R_iᵀ)(Σ R_i R_iᵀ)⁻¹, lightly damped."""
    a = sum(t @ r.T for t, r in zip(targets, rights))
    g = sum(r @ r.T for r in rights)
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, a.T).T


class _ProjFit:
    """Fits one projection's terms to the real weights of a layer, term after term on the remaining target."""

    def __init__(self, cfg: MoELowRankConfig, layer: int, p: str, weights, order: list[list[int]], gen):
        self.cfg, self.layer, self.p = cfg, layer, p
        self.spec = cfg.layers[layer]
        self.ps = self.spec.proj(p)
        self.E = cfg.num_experts
        self.order = order  # per expert: original unit of each compact unit
        self.full = [weights.get(p, e, torch.float64) for e in range(self.E)]  # original [m, n] / [n, m]
        self.target = [self._compact(self.full[e], order[e]) for e in range(self.E)]  # remaining, compact order
        self.out: Tensors = {}
        self.gen = gen

    def _compact(self, w, idx):
        idx = torch.tensor(idx, dtype=torch.long)
        return w[:, idx] if self.p == "down" else w[idx]

    def seg(self, e: int, seg: str) -> slice:
        units = self.spec.units
        ex = units.exact[e] if units else 0
        total = len(self.order[e])
        return {"all": slice(0, total), "exact": slice(0, ex), "lowrank": slice(ex, total)}[seg]

    def get(self, e: int, seg: str) -> torch.Tensor:
        s = self.seg(e, seg)
        return self.target[e][:, s] if self.p == "down" else self.target[e][s]

    def sub(self, e: int, seg: str, w: torch.Tensor) -> None:
        s = self.seg(e, seg)
        if self.p == "down":
            self.target[e][:, s] -= w
        else:
            self.target[e][s] -= w

    # ----- terms ------------------------------------------------------------------------------------------------
    def base(self) -> None:
        B = torch.stack(self.full).mean(0)  # [n, m] over the original units
        self.out["down", "base", None] = B
        for e in range(self.E):
            if self.ps.base.units == "all":
                self.sub(e, "all", B)
            else:
                idx = self.order[e][self.seg(e, "lowrank")]
                self.out["down", "base_idx", e] = torch.tensor(idx, dtype=torch.int32)
                self.sub(e, "lowrank", B[:, idx])

    def lowrank(self, scale: float = 1.0) -> None:
        lr, p = self.ps.lowrank, self.p
        tg = [scale * self.get(e, lr.units) for e in range(self.E)]
        rights: list[torch.Tensor] = []
        if lr.num_bases is not None:
            r, J = lr.ranks[0], lr.num_bases
            V = _top_right(torch.cat(tg), J * r)  # [J*r, in]
            self.out[p, "lr_v", None] = _stored(V, lr.act)
            for e in range(self.E):
                mix = torch.softmax(torch.randn(J, generator=self.gen), 0)
                self.out[p, "lr_mix", e] = mix
                rights.append(apply_act(lr.act, torch.einsum("j,jri->ri", mix.double(),
                                                             self.out[p, "lr_v", None].view(J, r, -1))))
        elif lr.right_groups is not None:
            blocks = []
            for g, rg in enumerate(lr.group_ranks()):
                members = [e for e in range(self.E) if lr.right_groups[e] == g]
                blocks.append(_stored(_top_right(torch.cat([tg[e] for e in members]), rg), lr.act))
            self.out[p, "lr_v", None] = torch.cat(blocks)
            rights = [apply_act(lr.act, blocks[lr.right_groups[e]]) for e in range(self.E)]
        elif lr.left_slots is None or lr.act != "identity":
            for e in range(self.E):
                v = _stored(_top_right(tg[e], lr.ranks[e]), lr.act)
                self.out[p, "lr_v", e] = v
                rights.append(apply_act(lr.act, v))
        lefts: list[torch.Tensor] = [None] * self.E
        if lr.left_slots is not None and lr.right_groups is None and lr.num_bases is None and lr.act == "identity":
            # shared left, per-expert right: pick each slot's left factor first, then fit the rights exactly
            slots, rights = [], [None] * self.E
            for s, rs in enumerate(lr.slot_ranks()):
                members = [e for e in range(self.E) if lr.left_slots[e] == s]
                slots.append(_top_right(torch.cat([tg[e] for e in members], 1).T, rs).T)  # [out, r]
                for e in members:
                    lefts[e] = slots[-1]
                    rights[e] = torch.linalg.lstsq(slots[-1], tg[e]).solution  # [r, in]
                    self.out[p, "lr_v", e] = rights[e]
            self.out[p, "lr_u", None] = torch.cat(slots, dim=1)
        elif lr.left_slots is not None:
            slots = []
            for s in range(len(lr.slot_ranks())):
                members = [e for e in range(self.E) if lr.left_slots[e] == s]
                slots.append(_lstsq_left([tg[e] for e in members], [rights[e] for e in members]))
                for e in members:
                    lefts[e] = slots[-1]
            self.out[p, "lr_u", None] = torch.cat(slots, dim=1)
        else:
            for e in range(self.E):
                lefts[e] = _lstsq_left([tg[e]], [rights[e]])
                self.out[p, "lr_u", e] = lefts[e]
        for e in range(self.E):
            self.sub(e, lr.units, lefts[e] @ rights[e])

    def dense(self) -> None:
        for e in range(self.E):
            w = self.get(e, self.ps.dense.units).clone()
            self.out[self.p, "weight", e] = w
            self.sub(e, self.ps.dense.units, w)

    def residual(self) -> None:
        res = self.ps.residual
        n_in = self.target[0].shape[1]
        buckets = torch.stack([torch.randperm(n_in, generator=self.gen) % res.width
                               for _ in range(max(res.groups) + 1)])  # [G, in], balanced
        self.out[self.p, "res_bucket", None] = buckets.int()
        for e in range(self.E):
            P = bucket_projection(buckets[res.groups[e]], res.width)  # [in, width]
            eta = self.get(e, "all") @ P  # least squares, since PᵀP = I
            self.out[self.p, "res_eta", e] = eta
            self.sub(e, "all", eta @ P.T)

    def fit(self) -> Tensors:
        ps = self.ps  # every term takes real signal; the last (low-rank, mostly full rank here) fits the rest
        if ps.base is not None:
            self.base()
        if ps.residual is not None:
            self.residual()
        if ps.dense is not None and ps.lowrank is not None and ps.dense.units == ps.lowrank.units:
            self.lowrank(scale=0.5)  # both over the same units: low-rank takes half, dense the exact rest
            self.dense()
        else:
            if ps.dense is not None:
                self.dense()
            if ps.lowrank is not None:
                self.lowrank()
        return self.out


def unit_orders(spec: LayerSpec, E: int, m: int, gen) -> list[list[int]]:
    """Original unit of each compact unit per expert: [exact | low-rank], the rest pruned."""
    if spec.units is None:
        return [list(range(m)) for _ in range(E)]
    out = []
    for e in range(E):
        perm = torch.randperm(m, generator=gen).tolist()
        out.append(perm[:spec.units.exact[e] + spec.units.lowrank[e]])
    return out


def build(src: str | Path, out: str | Path, layers: dict[int, str], rank: int = 256, seed: int = 0,
          dense_out: str | Path | None = None, format_version: int = 1) -> Path:
    """Write a compressed checkpoint of ``src`` with ``layers`` = {layer: case name}; optional dense export.

    Written as ``format_version`` 1 by default, exactly as checkpoints were before FP8 factors (no version-2 keys
    in config.json), so the vLLM tests' synthetic cases show that version-1 checkpoints keep serving."""
    src, out = Path(src), Path(out)
    ckpt = Checkpoint(src)
    arch = detect(ckpt.config)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    E, m = arch.num_experts, arch.intermediate_size
    specs = {l: CASES[c](E, m, rng, rank).model_copy(update={"method": f"synth-{c}"}) for l, c in layers.items()}
    cfg = MoELowRankConfig(format_version=format_version, method="synthetic", num_experts=E,
                           hidden_size=arch.hidden_size, intermediate_size=m, moe_prefix=arch.moe_prefix,
                           expert_names=arch.expert_names, moe_layers=list(arch.moe_layers), layers=specs)
    expert_names = {n for l in arch.moe_layers for n in expert_tensor_names(ckpt, arch, l)}
    tensors = ckpt.get_many(n for n in ckpt.tensors if n not in expert_names)
    for layer in arch.moe_layers:
        weights = load_expert_weights(ckpt, arch, layer)
        if layer not in specs:
            tensors.update({cfg.tensor_name(layer, p, "weight", e): weights.proj(p)[e].float().contiguous()
                            for p in PROJS for e in range(E)})
            continue
        order = unit_orders(specs[layer], E, m, gen)
        for p in PROJS:
            for (pp, suffix, e), t in _ProjFit(cfg, layer, p, weights, order, gen).fit().items():
                dtype = torch.int32 if suffix in ("res_bucket", "base_idx") else torch.float32
                tensors[cfg.tensor_name(layer, pp, suffix, e)] = t.to(dtype).contiguous()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    v2_keys = {"factor_dtype", "linear_quantization"} if format_version == 1 else set()
    config = dict(ckpt.config, quantization_config=cfg.model_dump(mode="json", exclude=v2_keys))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_aux_files(src, out)
    verify_checkpoint(out)
    if dense_out is not None:
        export_dense(out, dense_out, overwrite=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", required=True, help="e.g. 0=moe_svd,1=mobe,3=rfid")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--dense-out")
    a = ap.parse_args()
    layers = {int(k): v for k, v in (kv.split("=") for kv in a.layers.split(","))}
    build(a.src, a.out, layers, a.rank, dense_out=a.dense_out)


if __name__ == "__main__":
    main()
