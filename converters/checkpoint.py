"""Streaming access to HuggingFace safetensors checkpoints: one shard or an indexed set, tensor by tensor.

Headers are parsed and checked up front (missing shard, truncated file, broken header), so a bad checkpoint fails
before calibration starts. Tensors are read with ``safetensors.safe_open`` one file at a time and the mapping is
closed afterwards, so the resident set never holds more than the tensors asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_moe_lowrank.rounding import dequantize_blocks

from .errors import CheckpointError, UnsupportedModelError
from .output import writing

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Small files a checkpoint folder carries beside its weights; copied unchanged to every output.
AUX_PATTERNS = (
    "tokenizer*", "*.jinja", "chat_template.json", "generation_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken", "preprocessor_config.json", "*.py",
)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_TAGS = ("F8_E4M3",)  # the weight dtype of every FP8 checkpoint format read here (float8_e4m3fn)
BLOCK_SCALE, TENSOR_SCALE, INPUT_SCALE = "weight_scale_inv", "weight_scale", "input_scale"


class SourceQuant(BaseModel):
    """How an FP8 source checkpoint stores its weights (its ``quantization_config``), or None for a float one.

    Block FP8 (DeepSeek-V3, Kimi-K2, Qwen3-*-FP8): float8_e4m3fn ``weight`` [out, in] with a float32
    ``weight_scale_inv`` [ceil(out/bm), ceil(in/bn)] per ``weight_block_size`` = [bm, bn] block; the real weight is
    ``weight · scale`` block by block. Per-tensor FP8: one float32 ``weight_scale`` per tensor (and with
    ``activation_scheme: static`` an ``input_scale``). Carried into the moe_lowrank config as
    ``linear_quantization`` so the plugin serves the non-expert layers in FP8.
    """

    model_config = ConfigDict(frozen=True)
    quant_method: str = "fp8"
    weight_block_size: tuple[int, int] | None = None
    activation_scheme: str = "dynamic"
    ignored: tuple[str, ...] = ()  # modules the source left unquantized (ignored_layers / modules_to_not_convert)

    @classmethod
    def from_config(cls, qc: dict | None, source: str = "config.json") -> SourceQuant | None:
        """Parse a source ``quantization_config``; refuse every format other than FP8, naming it."""
        if not qc:
            return None
        qm = str(qc.get("quant_method", "?"))
        if qm != "fp8":
            hint = " (gpt-oss MXFP4 experts)" if qm == "mxfp4" else ""
            raise UnsupportedModelError(f"{source}: the checkpoint is already quantized with quant_method={qm!r}"
                                        f"{hint}; moe-convert reads float (bf16/fp16/fp32) and FP8 (quant_method "
                                        "'fp8', block or per-tensor) checkpoints: convert the original weights")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedModelError(f"{source}: FP8 format fmt={qc['fmt']!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(block) <= 0):
            raise UnsupportedModelError(f"{source}: quantization_config.weight_block_size={block} must be two "
                                        "positive integers [block_out, block_in]")
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()
        return cls(weight_block_size=tuple(block) if block else None,
                   activation_scheme=qc.get("activation_scheme", "dynamic"), ignored=tuple(ignored))

    def linear_quantization(self) -> dict:
        """The source's fp8 settings in the keys vLLM's Fp8Config reads (the moe_lowrank ``linear_quantization``)."""
        out = {"quant_method": self.quant_method, "activation_scheme": self.activation_scheme,
               "weight_block_size": list(self.weight_block_size) if self.weight_block_size else None}
        if self.ignored:
            out["ignored_layers"] = list(self.ignored)
        return out

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale of an FP8 weight of ``shape`` (2-D, or stacked 3-D experts)."""
        if self.weight_block_size is None:
            return ()
        bm, bn = self.weight_block_size
        return (*shape[:-2], -(-shape[-2] // bm), -(-shape[-1] // bn))


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w · scale`` in float32, then cast: per [bm, bn] block (``block``) or one scale for the whole tensor.

    w: [..., out, in] float8_e4m3fn; scale: [..., ceil(out/bm), ceil(in/bn)] or a single element."""
    return dequantize_blocks(w, scale, block, dtype)


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name, relative to the checkpoint folder
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The torch dtype of a floating-point tensor; None for integer tensors."""
        return _TORCH_DTYPES.get(self.dtype)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; raise CheckpointError naming the file if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download this shard")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {hlen} bytes, file has {size}); "
                                  "re-download this shard")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err}); re-download this shard") from None
    out: dict[str, TensorInfo] = {}
    data_size = size - 8 - hlen
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"which has {data_size} bytes; re-download this shard")
        shape = tuple(meta["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if meta["dtype"] in _DTYPE_BYTES and end - begin != numel * _DTYPE_BYTES[meta["dtype"]]:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: {end - begin} bytes for shape "
                                  f"{list(shape)} {meta['dtype']}; re-download this shard")
        out[name] = TensorInfo(file=path.name, dtype=meta["dtype"], shape=shape)
    return out


class Checkpoint:
    """A read-only HuggingFace checkpoint folder: config.json plus safetensors weights."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint folder not found")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg}: missing; a HuggingFace checkpoint folder needs config.json")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg}: not valid JSON ({err})") from None
        self.tensors: dict[str, TensorInfo] = self._scan()

    @functools.cached_property
    def source_quant(self) -> SourceQuant | None:
        """How the weights are quantized: the FP8 settings of an FP8 checkpoint (or of the non-expert layers of a
        moe_lowrank checkpoint made from one), None for a float checkpoint. Every FP8 weight's scale is checked
        here (present, float, the shape the block size implies), so a bad one fails before any work starts."""
        qc = self.config.get("quantization_config")
        experts: tuple[str, ...] = ()  # a moe_lowrank checkpoint's expert tensors follow format.py, not this
        if isinstance(qc, dict) and qc.get("quant_method") == "moe_lowrank":
            experts = tuple(qc["moe_prefix"].format(layer=l) + "." for l in qc.get("moe_layers", []))
            qc = qc.get("linear_quantization")
        quant = SourceQuant.from_config(qc, str(self.path / "config.json"))
        for name, info in self.tensors.items():
            if info.dtype in FP8_TAGS and not name.startswith(experts):
                self._check_scale(name, info, quant)
        return quant

    def _check_scale(self, name: str, info: TensorInfo, quant: SourceQuant | None) -> None:
        where = self.path / info.file
        if quant is None:
            raise CheckpointError(f"{where}: tensor {name!r} is float8 but config.json has no fp8 "
                                  "quantization_config; the config does not belong to these weights")
        scale = self.scale_name(name, quant)
        if scale not in self.tensors:
            raise CheckpointError(f"{where}: FP8 weight {name!r} has no scale tensor {scale!r}; the checkpoint is "
                                  "incomplete (re-download it)")
        s = self.tensors[scale]
        if s.float_dtype is None:
            raise CheckpointError(f"{self.path / s.file}: scale {scale!r} is {s.dtype}, expected a float tensor")
        want = quant.scale_shape(info.shape)
        ok = s.shape == want if quant.weight_block_size else math.prod(s.shape) == 1
        if not ok:
            block = (f"weight_block_size {list(quant.weight_block_size)} in config.json" if quant.weight_block_size
                     else "per-tensor FP8 (no weight_block_size in config.json)")
            raise CheckpointError(f"{self.path / s.file}: scale {scale!r} has shape {list(s.shape)}, but weight "
                                  f"{name!r} {list(info.shape)} with {block} needs {list(want) or [1]}; the block "
                                  "size in config.json does not match the checkpoint's scales")

    def scale_name(self, name: str, quant: SourceQuant | None = None) -> str:
        """The scale tensor of FP8 weight ``name`` (``*.weight_scale_inv`` for block FP8, else ``*.weight_scale``)."""
        quant = quant or self.source_quant
        stem = name.removesuffix("weight")
        return stem + (BLOCK_SCALE if quant is not None and quant.weight_block_size else TENSOR_SCALE)

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype in FP8_TAGS

    def companions(self, name: str) -> list[str]:
        """The scale tensors stored beside weight ``name`` (none for a float weight)."""
        stem = name.removesuffix("weight")
        return [stem + s for s in (BLOCK_SCALE, TENSOR_SCALE, INPUT_SCALE) if name.endswith("weight") and
                stem + s in self.tensors]

    @functools.cached_property
    def scale_tensors(self) -> frozenset[str]:
        """Every FP8 scale tensor of the checkpoint (what a float copy of the model leaves out)."""
        return frozenset(c for n, info in self.tensors.items() if info.dtype in FP8_TAGS for c in self.companions(n))

    @property
    def dequant_dtype(self) -> torch.dtype:
        """The dtype FP8 weights are dequantized to: the dtype of the checkpoint's float tensors (norms,
        embeddings; bfloat16 for published FP8 checkpoints)."""
        return self.float_dtype()

    def _scan(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: unreadable shard index ({err!r})") from None
            for name, f in weight_map.items():  # before any file is touched
                _check_shard_name(index, name, f)
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(f"{self.path}: shard(s) listed in {INDEX_NAME} are missing: "
                                      f"{', '.join(missing)}; download them or fix the index")
            found: dict[str, TensorInfo] = {}
            for f in files:
                found.update(read_header(self.path / f))
            absent = [n for n, f in weight_map.items() if n not in found or found[n].file != f]
            if absent:
                raise CheckpointError(f"{index}: tensor {absent[0]!r} (and {len(absent) - 1} more) is not in the "
                                      f"shard the index names ({weight_map[absent[0]]}); the shard is corrupt or "
                                      "from another checkpoint")
            return found
        single = self.path / SINGLE_NAME
        if single.is_file():
            return read_header(single)
        shards = sorted(self.path.glob("*.safetensors"))
        if len(shards) == 1:
            return read_header(shards[0])
        if shards:
            raise CheckpointError(f"{self.path}: {len(shards)} safetensors files but no {INDEX_NAME}")
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError(f"{self.path}: only PyTorch .bin weights found; save the model with "
                                  "safe_serialization=True (safetensors) first")
        raise CheckpointError(f"{self.path}: no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint") from None

    def float_dtype(self) -> torch.dtype:
        """The dtype most floating-point weights are stored in (FP8 weights and their scales not counted)."""
        counts: dict[torch.dtype, int] = defaultdict(int)
        for n, t in self.tensors.items():
            if t.float_dtype is not None and not n.endswith((BLOCK_SCALE, TENSOR_SCALE, INPUT_SCALE)):
                counts[t.float_dtype] += 1
        return max(counts, key=counts.get) if counts else torch.float32

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors one at a time. Each read maps its shard only while copying that tensor out, so the
        mapped pages (which count as resident) never exceed one tensor."""
        for n in names:
            path = self.path / self.info(n).file
            try:
                with safe_open(path, framework="pt") as f:
                    t = f.get_tensor(n)
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot read tensor {n!r}: {err}") from None
            yield n, t

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors(names))

    def iter_dequantized(self, names: Iterable[str],
                         dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Like iter_tensors, but each FP8 weight comes back dequantized with its scale (``dtype``, default
        dequant_dtype), one tensor at a time; float tensors come back unchanged."""
        for n, t in self.iter_tensors(names):
            if t.dtype == torch.float8_e4m3fn:
                quant = self.source_quant
                if quant is None:
                    self._check_scale(n, self.info(n), None)
                scale = self.get(self.scale_name(n, quant))
                t = dequantize_fp8(t, scale, quant.weight_block_size, dtype or self.dequant_dtype)
            yield n, t

    def get_dequantized(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return dict(self.iter_dequantized(names, dtype))

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]


def _check_shard_name(index: Path, tensor: str, file: object) -> None:
    """A shard named by the index must be a file directly in the checkpoint folder. Checked on the name, not on
    the resolved target: a hub cache snapshot's shards are symlinks into its blobs folder."""
    norm = os.path.normpath(file) if isinstance(file, str) and file else ""
    if not norm or os.path.isabs(file) or norm in (".", "..") or "/" in norm or os.sep in norm or "\\" in norm:
        raise CheckpointError(f"{index}: tensor {tensor!r} points to {file!r}, which is not a file in the "
                              "checkpoint folder; the index is corrupt or tampered with (refusing to open it)")


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)


def write_json(obj: object, path: Path) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)


def write_index(weight_map: dict[str, str], total_bytes: int, folder: Path) -> None:
    write_json({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
               folder / INDEX_NAME)


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config, chat template and similar small files."""
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in copied:
                with writing(dst / f.name):
                    shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied
