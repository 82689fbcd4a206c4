"""``--export-dense``: a plain HuggingFace checkpoint whose experts are the reconstructed dense weights.

For transformers users, and as the reference the vLLM plugin is tested against. Streams one layer at a time.
Non-expert FP8 layers (a checkpoint converted from an FP8 source) and the FP8 experts of MoE layers left dense
(``dense_quantization``) are written dequantized, without their scales.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from vllm_moe_lowrank.format import PROJS, MoELowRankConfig
from vllm_moe_lowrank.materialize import dense_weight, materialize_projection

from .arch import FAMILIES, detect
from .checkpoint import Checkpoint, copy_aux_files, save_shard, write_index, write_json
from .errors import ConvertError
from .experts import ExpertWeights, source_layout
from .output import EXPORT_TMP, Staging, check_paths

EXPORT_MARKER = "moe_lowrank_dense_export.json"  # identifies a folder this wrote (--overwrite replaces only those)


def export_dense(compressed: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``out`` (via a temporary folder) with every compressed layer's experts materialized as dense weights.

    dtype defaults to the dtype of the compressed factors.
    """
    out = Path(out)
    check_paths(Path(compressed), {"--export-dense": (out, EXPORT_MARKER)}, overwrite)
    ckpt = Checkpoint(compressed)
    cfg = MoELowRankConfig.from_hf_config(ckpt.config)
    staging = Staging(out, EXPORT_TMP)
    try:
        if staging.exists():
            staging.reuse(clear=True)  # refuses a live export; an interrupted one is redone from the start
        else:
            staging.create()
        _write(ckpt, cfg, staging.dir, dtype, compressed)
        staging.publish(EXPORT_MARKER)
    finally:
        staging.release()
    return out


def _write(ckpt: Checkpoint, cfg: MoELowRankConfig, tmp: Path, dtype: torch.dtype | None, source) -> None:
    expert_specs = cfg.all_expert_tensor_specs()
    if dtype is None:  # the compressed layers' factors (not the layers left dense); FP8 factors: the model's dtype
        dtypes = [ckpt.info(n).float_dtype for layer in cfg.layers for n, s in cfg.tensor_specs(layer).items()
                  if s.dtype == "float"]
        dtype = max(set(dtypes), key=dtypes.count) if dtypes else ckpt.float_dtype()
    # group the non-expert tensors by the shard they came from, so the export keeps the layer-per-shard layout
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, info in ckpt.tensors.items():
        if name not in expert_specs and name not in ckpt.scale_tensors:  # FP8 layers are written dequantized
            by_file[info.file].append(name)
    layers_of_file: dict[str, list[int]] = defaultdict(list)  # the shard holding each MoE layer's experts
    for layer in cfg.moe_layers:
        first = next(iter(cfg.tensor_specs(layer) if layer in cfg.layers else cfg.dense_tensor_specs(layer)))
        layers_of_file[ckpt.info(first).file].append(layer)
    weight_map: dict[str, str] = {}
    for file in sorted(set(by_file) | set(layers_of_file)):
        tensors = ckpt.get_dequantized(by_file.get(file, []))  # FP8 non-expert weights: weight · scale
        for layer in layers_of_file.get(file, []):
            tensors.update(_source_layout(cfg, ckpt.config, layer, _dense_layer(cfg, ckpt, layer, dtype)))
        save_shard(tensors, tmp / file)
        weight_map.update({n: file for n in tensors})
    write_index(weight_map, sum(os.path.getsize(tmp / f) for f in set(weight_map.values())), tmp)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    write_json(config, tmp / "config.json")
    copy_aux_files(ckpt.path, tmp)
    write_json({"written_by": "moe-convert --export-dense", "source": str(source)}, tmp / EXPORT_MARKER)


def _source_layout(cfg: MoELowRankConfig, config: dict, layer: int,
                   per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's dense experts in the layout transformers reads for the family: fused where the family stores
    them fused (Granite-MoE), else unchanged (one tensor per expert and projection, the format's own names)."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None or family.fused is None:
        return per_expert
    arch = detect({k: v for k, v in config.items() if k != "quantization_config"})
    stacked = {p: torch.stack([per_expert[cfg.tensor_name(layer, p, "weight", e)] for e in range(cfg.num_experts)])
               for p in PROJS}
    return source_layout(arch, layer, ExpertWeights(**stacked))


def _dense_layer(cfg: MoELowRankConfig, ckpt: Checkpoint, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A MoE layer's dense expert weights: a compressed layer materialized, a dense-kept one as stored (its FP8
    weights dequantized with their scales: ``dense_quantization``), in ``dtype``."""
    if layer not in cfg.layers:
        stored = ckpt.get_many(cfg.dense_tensor_specs(layer))
        if cfg.dense_quantization is None:  # as stored (no float64 round trip)
            return stored
        return {cfg.tensor_name(layer, p, "weight", e): dense_weight(cfg, layer, p, e, stored.__getitem__, dtype)
                for e in range(cfg.num_experts) for p in PROJS}
    stored = ckpt.get_many(cfg.tensor_specs(layer))
    return {cfg.tensor_name(layer, p, "weight", e): materialize_projection(cfg, layer, p, e, stored.__getitem__)
            .to(dtype).contiguous() for e in range(cfg.num_experts) for p in PROJS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Materialize a moe_lowrank checkpoint as a plain dense HF checkpoint")
    ap.add_argument("compressed")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        export_dense(a.compressed, a.out, getattr(torch, a.dtype) if a.dtype else None, a.overwrite)
    except (ConvertError, ValueError) as err:  # FormatError is a ValueError
        print(f"export-dense: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"dense export written to {a.out}")


if __name__ == "__main__":
    main()
