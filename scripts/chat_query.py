"""Ask a running OpenAI-compatible server (vllm serve) one chat question and print the answer.

    python scripts/chat_query.py --base-url http://127.0.0.1:8000 [--model ID] [--question TEXT]

The model defaults to the first one the server lists. Exit 1 when the server gives no choice back.
Used by scripts/demo.sh and by the serving tests.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_QUESTION = "What does the built-in function len() return?"


def ask(base_url: str, question: str, model: str | None = None, max_tokens: int = 48, timeout: float = 120.0):
    """(model id, answer text, finish_reason) from one greedy chat completion."""
    from openai import OpenAI  # imported here so that --help works without the package

    client = OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
    if model is None:
        models = client.models.list().data
        if not models:
            raise RuntimeError(f"{base_url}/v1/models lists no model")
        model = models[0].id
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    if not resp.choices:
        raise RuntimeError("the server answered with no choices")
    choice = resp.choices[0]
    return model, choice.message.content or "", choice.finish_reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask a vLLM server one chat question.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--model", help="model id (default: the first one the server lists)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        model, answer, finish = ask(args.base_url, args.question, args.model, args.max_tokens)
    except Exception as exc:  # print one clear line instead of a client traceback
        print(f"chat_query: request to {args.base_url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"model:    {model}")
    print(f"question: {args.question}")
    print(f"answer:   {answer.strip() or '(empty answer)'}")
    print(f"finish:   {finish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
