"""Calibration text → fixed-length token windows (txt, jsonl with a text field, or parquet)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import CalibDataError


# Characters no text file holds in quantity: C0/C1 controls (tab, newlines and form feed allowed) and the
# replacement character. A file with more than this share of them is refused as binary.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_MAX_CONTROL = 0.1


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise CalibDataError(f"--calib-data {path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                             f"{err.start}); is it a binary file? Convert the text to UTF-8") from None


def _check_text(where: str, text: str, lines: bool = False) -> None:
    """Refuse text that is mostly control characters (binary data that happens to decode). ``where``: the file
    (``lines``: add the line of the first control character) or its row."""
    bad = len(_CONTROL.findall(text))
    if text and bad > _MAX_CONTROL * len(text):
        first = _CONTROL.search(text)
        at = f"{where}:{1 + text.count(chr(10), 0, first.start())}" if lines else where
        raise CalibDataError(f"--calib-data {at}: not text: {bad:,} of {len(text):,} characters are control "
                             f"characters (first: {first.group()!r}); is it a binary file?")


def _field(where: str, value: object, text_field: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else f"of type {type(value).__name__}, not a string"
        raise CalibDataError(f"--calib-data {where}: {text_field!r} is {kind}; every row needs text")
    _check_text(where, value)
    return value


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a calibration file: a .txt is one document; .jsonl/.parquet give one per row. Non-UTF-8 or
    binary content, and rows whose text field is null or not a string, are errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CalibDataError(f"--calib-data {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md", ".rst"):
        docs = [_decode(path, path.read_bytes())]
        _check_text(str(path), docs[0], lines=True)
    elif suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(_decode(path, path.read_bytes()).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibDataError(f"--calib-data {path}:{i}: not a JSON line ({err})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise CalibDataError(f"--calib-data {path}:{i}: no {text_field!r} field (set --text-field)")
            docs.append(_field(f"{path}:{i}", row[text_field], text_field))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CalibDataError("--calib-data: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises its own types
            raise CalibDataError(f"--calib-data {path}: not a readable parquet file ({err})") from None
        if text_field not in table.column_names:
            raise CalibDataError(f"--calib-data {path}: no column {text_field!r} (columns: "
                                 f"{', '.join(table.column_names)}; set --text-field)")
        docs = [_field(f"{path} row {i}", t, text_field) for i, t in enumerate(table.column(text_field).to_pylist())]
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
