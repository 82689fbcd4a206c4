"""Calibration text → fixed-length token windows (txt, jsonl with a text field, or parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CalibDataError


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a calibration file: a .txt is one document; .jsonl/.parquet give one per row."""
    path = Path(path)
    if not path.is_file():
        raise CalibDataError(f"--calib-data {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md", ".rst"):
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    elif suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibDataError(f"--calib-data {path}:{i}: not a JSON line ({err})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise CalibDataError(f"--calib-data {path}:{i}: no {text_field!r} field (set --text-field)")
            docs.append(str(row[text_field]))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CalibDataError("--calib-data: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise CalibDataError(f"--calib-data {path}: no column {text_field!r} (columns: "
                                 f"{', '.join(table.column_names)}; set --text-field)")
        docs = [str(t) for t in table.column(text_field).to_pylist() if t is not None]
    else:
        raise CalibDataError(f"--calib-data {path}: unknown format {suffix!r}; use .txt, .jsonl or .parquet")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibDataError(f"--calib-data {path}: no text in the file")
    return docs


def token_windows(docs: list[str], tokenizer, num_samples: int, seq_len: int, seed: int,
                  source: str = "--calib-data") -> torch.Tensor:
    """``[num_samples, seq_len]`` non-overlapping windows drawn at random (seeded) from the concatenated text."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        stream.extend(sep)
    need = num_samples * seq_len
    if len(stream) < need:
        raise CalibDataError(
            f"{source}: {len(stream):,} tokens, fewer than --num-samples {num_samples} × --seq-len {seq_len} = "
            f"{need:,}; give more text or lower --num-samples / --seq-len")
    ids = torch.tensor(stream[: (len(stream) // seq_len) * seq_len], dtype=torch.long).view(-1, seq_len)
    pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
    return ids[pick.sort().values]  # [num_samples, seq_len]
