"""Held-out perplexity on fixed token windows, so numbers compare across runs and checkpoints.

The text is tokenized without special tokens, cut to its first ``max_tokens`` tokens and split into
non-overlapping windows of ``window`` tokens; each window is scored independently (every token but the first is
predicted from its prefix inside the window). PPL = exp(mean NLL over all predicted tokens).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch


def eval_windows(ckpt: str | Path, text_file: str | Path, window: int = 256, max_tokens: int = 16384) -> torch.Tensor:
    """``[num_windows, window]`` token ids of the held-out text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{text_file}: {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window]).view(n, window)


def is_compressed(ckpt: str | Path) -> bool:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "moe_lowrank"


@torch.no_grad()
def transformers_nll(ckpt: str | Path, windows: torch.Tensor, batch: int = 8) -> tuple[float, int]:
    """(sum of NLL, predicted tokens) with transformers in float32; compressed checkpoints are materialized."""
    from transformers import AutoModelForCausalLM

    if is_compressed(ckpt):
        from vllm_moe_lowrank.converters.export_dense import export_dense

        with tempfile.TemporaryDirectory() as tmp:
            dense = export_dense(ckpt, Path(tmp) / "dense", dtype=torch.float32)
            return transformers_nll(dense, windows, batch)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk).logits[:, :-1].float()  # [B, W-1, V]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    return total, count


def perplexity(ckpt: str | Path, text_file: str | Path, window: int = 256, max_tokens: int = 16384,
               backend: str = "transformers") -> dict:
    windows = eval_windows(ckpt, text_file, window, max_tokens)
    if backend != "transformers":
        raise ValueError(f"backend {backend!r} is not available")
    total, count = transformers_nll(ckpt, windows)
    return {"checkpoint": str(ckpt), "text": str(text_file), "backend": backend, "window": window,
            "windows": windows.shape[0], "tokens": count, "nll": total / count, "ppl": math.exp(total / count)}
