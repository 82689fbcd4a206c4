"""``--export-dense``: a plain HuggingFace checkpoint whose experts are the reconstructed dense weights.

For transformers users, and as the reference the vLLM plugin is tested against. Streams one layer at a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from vllm_moe_lowrank.format import PROJS, MoELowRankConfig, materialize_projection

from .checkpoint import Checkpoint, copy_aux_files, save_shard, write_index, write_json
from .errors import OutputError


def export_dense(compressed: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``out`` (via a temporary folder) with every compressed layer's experts materialized as dense weights.

    dtype defaults to the dtype of the compressed factors.
    """
    ckpt = Checkpoint(compressed)
    cfg = MoELowRankConfig.from_hf_config(ckpt.config)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: export folder exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    expert_specs = cfg.all_expert_tensor_specs()
    if dtype is None:
        dtypes = [ckpt.info(n).float_dtype for n, s in expert_specs.items() if s.dtype == "float"]
        dtype = max(set(dtypes), key=dtypes.count)
    # group the non-expert tensors by the shard they came from, so the export keeps the layer-per-shard layout
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, info in ckpt.tensors.items():
        if name not in expert_specs:
            by_file[info.file].append(name)
    layers_of_file: dict[str, list[int]] = defaultdict(list)  # the shard holding each MoE layer's experts
    for layer in cfg.moe_layers:
        first = next(iter(cfg.tensor_specs(layer) if layer in cfg.layers else cfg.dense_tensor_specs(layer)))
        layers_of_file[ckpt.info(first).file].append(layer)
    weight_map: dict[str, str] = {}
    for file in sorted(set(by_file) | set(layers_of_file)):
        tensors = ckpt.get_many(by_file.get(file, []))
        for layer in layers_of_file.get(file, []):
            if layer in cfg.layers:
                tensors.update(_dense_layer(cfg, ckpt, layer, dtype))
            else:
                tensors.update(ckpt.get_many(cfg.dense_tensor_specs(layer)))
        save_shard(tensors, tmp / file)
        weight_map.update({n: file for n in tensors})
    write_index(weight_map, sum(os.path.getsize(tmp / f) for f in set(weight_map.values())), tmp)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    write_json(config, tmp / "config.json")
    copy_aux_files(ckpt.path, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _dense_layer(cfg: MoELowRankConfig, ckpt: Checkpoint, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
    export_dense(a.compressed, a.out, getattr(torch, a.dtype) if a.dtype else None, a.overwrite)
    print(f"dense export written to {a.out}")


if __name__ == "__main__":
    main()
