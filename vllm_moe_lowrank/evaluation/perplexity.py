"""Held-out perplexity on fixed token windows, so numbers compare across runs and checkpoints.

The text is tokenized without special tokens, cut to its first ``max_tokens`` tokens and split into
non-overlapping windows of ``window`` tokens; each window is scored independently (every token but the first is
predicted from its prefix inside the window). PPL = exp(mean NLL over all predicted tokens).

Backends score the same windows (same token ids, same count):

* ``vllm``: vLLM prompt logprobs (``vllm_backend.py``), i.e. what ``vllm serve`` computes; compressed
  checkpoints run through the plugin.
* ``transformers``: float32 forward in transformers; a compressed checkpoint is first materialized into a dense
  export (``export_dense``), which is the reference the plugin is tested against, not the served path.
* ``auto`` (``moe-eval ppl``'s default): ``vllm`` when vLLM is importable, else ``transformers``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import time
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


BACKENDS = ("auto", "vllm", "transformers")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend 'vllm': vLLM is not installed (use --backend transformers, or `make venv`)")
    return backend


def checkpoint_info(ckpt: str | Path) -> dict:
    """method / target and achieved ratio of a compressed checkpoint (from its quantization_config); dense: ratio 0."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "moe_lowrank":
        return {"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0}
    return {"method": qc.get("method"), "ratio": qc.get("target_ratio"), "achieved_ratio": qc.get("achieved_ratio")}


def perplexity(ckpt: str | Path, text_file: str | Path, window: int = 256, max_tokens: int = 16384,
               backend: str = "transformers", enforce_eager: bool = True) -> dict:
    """Held-out perplexity of a dense or compressed checkpoint; see the module docstring for the protocol.

    The Python default stays ``transformers`` (scripts written against it keep their numbers and speed); the
    ``moe-eval ppl`` command defaults to ``auto``.
    """
    backend = resolve_backend(backend)
    windows = eval_windows(ckpt, text_file, window, max_tokens)  # [N, window]
    t0 = time.time()
    if backend == "vllm":
        from .vllm_backend import vllm_nll

        total, count = vllm_nll(ckpt, windows, enforce_eager=enforce_eager)
    else:
        total, count = transformers_nll(ckpt, windows)
    return {"checkpoint": str(ckpt), **checkpoint_info(ckpt), "text": str(text_file), "backend": backend,
            "window": window, "windows": windows.shape[0], "tokens": count, "nll": total / count,
            "ppl": math.exp(total / count), "seconds": round(time.time() - t0, 1)}
