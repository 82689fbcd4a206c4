"""Perplexity through vLLM: the negative log-likelihood of each window's tokens from vLLM's prompt logprobs.

The windows are handed to vLLM as token ids (no re-tokenization), one request per window, with
``prompt_logprobs=0``: vLLM returns, for every prompt position but the first, the log-probability of the actual
prompt token under the served model (raw log-softmax of the logits). So a compressed checkpoint is scored by the
plugin's compute path, exactly as ``vllm serve`` runs it, and the token count equals the transformers backend's.

vLLM starts its engine core in a separate process; callers that run as a script need an
``if __name__ == "__main__":`` guard (the ``moe-eval`` entry point has one).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch


def make_llm(ckpt: str | Path, window: int, dtype: str = "float32", enforce_eager: bool = True, seed: int = 0):
    """An offline vLLM engine for scoring windows of ``window`` tokens."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU backend's default is far larger
    from vllm import LLM

    # +1: vLLM counts the one generated token against max_model_len
    return LLM(model=str(ckpt), dtype=dtype, max_model_len=window + 1, enforce_eager=enforce_eager, seed=seed,
               enable_prefix_caching=False)


def shutdown(llm) -> None:
    """Stop the engine core process now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def llm_nll(llm, windows: torch.Tensor) -> tuple[float, int]:
    """(sum of NLL, predicted tokens) of ``windows`` [N, W] under a running vLLM engine."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": w.tolist()} for w in windows]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    total, count = 0.0, 0
    for prompt, out in zip(prompts, outs):
        ids = prompt["prompt_token_ids"]
        lps = out.prompt_logprobs  # [W] per position {token id: Logprob}; position 0 is None
        if lps is None or len(lps) != len(ids):
            raise RuntimeError(f"vLLM returned {None if lps is None else len(lps)} prompt logprobs for a "
                               f"{len(ids)}-token window")
        for pos in range(1, len(ids)):
            entry = lps[pos]
            if entry is None or ids[pos] not in entry:
                raise RuntimeError(f"vLLM returned no logprob for prompt token {ids[pos]} at position {pos}")
            total -= float(entry[ids[pos]].logprob)
            count += 1
    return total, count


def vllm_nll(ckpt: str | Path, windows: torch.Tensor, dtype: str = "float32",
             enforce_eager: bool = True) -> tuple[float, int]:
    """(sum of NLL, predicted tokens) with a fresh vLLM engine on ``ckpt``, shut down afterwards."""
    llm = make_llm(ckpt, windows.shape[1], dtype, enforce_eager)
    try:
        return llm_nll(llm, windows)
    finally:
        shutdown(llm)
