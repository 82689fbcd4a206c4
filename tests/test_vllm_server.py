"""``vllm serve --quantization moe_lowrank`` through the openai client, for every converter format.

Completions, chat and streaming equal transformers on the dense export token for token; 32 concurrent streaming
requests each equal the same request run alone. One server per format (module fixture), enforce_eager.

Each server is the CPU image's command sequence run outside Docker: the environment comes from
deploy/install-cpu.sh (``make venv``), the command is deploy/Dockerfile.cpu's ENTRYPOINT plus arguments, and
readiness is the image's own probe, deploy/healthcheck.py.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dockerfile import cpu_image_entrypoint
from vllm_cases import CONVERTER_CASES, FIXTURE, MAX_TOKENS, ROOT

pytestmark = pytest.mark.vllm
START_TIMEOUT = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    """deploy/healthcheck.py --wait: the image's startup probe (/v1/models lists the model, then /health)."""
    state = log.with_name("healthcheck.state")
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--base-url",
                        f"http://127.0.0.1:{port}", "--state-file", str(state), "--wait", str(START_TIMEOUT),
                        "--pid", str(proc.pid)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"vllm serve not healthy (healthcheck exit {r.returncode}: {r.stdout}{r.stderr}):\n"
                           f"{log.read_text()[-4000:]}")


@pytest.fixture(scope="module", params=list(CONVERTER_CASES))
def server(request, checkpoints, hf_refs, tmp_path_factory):
    from openai import OpenAI

    name = request.param
    comp, _ = checkpoints(name)
    ref = hf_refs(name)
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    entrypoint = cpu_image_entrypoint()  # ["vllm", "serve"], resolved in this environment's bin folder
    cmd = [str(Path(sys.executable).with_name(entrypoint[0])), *entrypoint[1:], str(comp), "--quantization",
           "moe_lowrank", "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", name]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log)
        yield name, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300), ref
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def complete(client, model, prompt, max_tokens=MAX_TOKENS) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True})
    return list(r.choices[0].token_ids)


def stream(client, model, prompt, max_tokens=MAX_TOKENS, ignore_eos=False) -> tuple[list[int], str]:
    ids, text = [], ""
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"return_token_ids": True,
                                                                    "ignore_eos": ignore_eos}):
        for c in chunk.choices:
            ids += list(getattr(c, "token_ids", None) or [])
            text += c.text or ""
    return ids, text


def test_completions(server):
    name, client, ref = server
    for prompt, want in zip(ref["prompts"], ref["tokens"]):
        assert complete(client, name, prompt) == want
    # a text prompt tokenizes as the reference did
    from transformers import AutoTokenizer

    from vllm_cases import PROMPTS

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == tok.decode(ref["tokens"][0])


def test_chat(server):
    from vllm_cases import CHATS

    name, client, ref = server
    for messages, want in zip(CHATS, ref["chat_tokens"]):
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert list(r.choices[0].token_ids) == want


def test_streaming(server):
    name, client, ref = server
    for prompt, want in zip(ref["prompts"], ref["tokens"]):
        ids, text = stream(client, name, prompt)
        assert ids == want
        assert text  # the text deltas arrive too


def test_32_concurrent_streams_equal_single(server):
    """Under load (continuous batching of 32 streams) every output equals the same request alone."""
    name, client, _ = server
    lines = [l for l in (FIXTURE / "eval.txt").read_text().splitlines() if len(l.split()) >= 4]
    prompts = [" ".join(lines[i * 7].split()[: 4 + i % 13]) for i in range(32)]
    alone = [stream(client, name, p, 24, ignore_eos=True)[0] for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: stream(client, name, p, 24, ignore_eos=True)[0], prompts))
    assert all(len(a) == 24 for a in alone)
    bad = [i for i in range(32) if together[i] != alone[i]]
    assert not bad, f"{len(bad)} of 32 concurrent outputs differ from the same request alone, e.g. #{bad[0]}"
