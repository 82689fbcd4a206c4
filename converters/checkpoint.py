"""Streaming access to HuggingFace safetensors checkpoints: one shard or an indexed set, tensor by tensor.

Headers are parsed and checked up front (missing shard, truncated file, broken header), so a bad checkpoint fails
before calibration starts. Tensors are read with ``safetensors.safe_open`` one file at a time and the mapping is
closed afterwards, so the resident set never holds more than the tensors asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

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

    def _scan(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: unreadable shard index ({err!r})") from None
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
        """The dtype most floating-point weights are stored in."""
        counts: dict[torch.dtype, int] = defaultdict(int)
        for t in self.tensors.values():
            if t.float_dtype is not None:
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

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def write_json(obj: object, path: Path) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
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
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied
