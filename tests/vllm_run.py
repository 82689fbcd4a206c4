"""Run one offline vLLM generation in a fresh process and print the greedy tokens as JSON (TP/EP tests).

    python tests/vllm_run.py MODEL PROMPTS_JSON [--tp N] [--ep] [--max-tokens N] [--backend mp|ray]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts", help="JSON list of token-id lists")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--backend", default="mp", choices=["mp", "ray"], help="distributed executor backend")
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              tensor_parallel_size=a.tp, enable_expert_parallel=a.ep, distributed_executor_backend=a.backend)
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(a.prompts)],
                        SamplingParams(temperature=0, max_tokens=a.max_tokens))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
