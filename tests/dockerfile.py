"""A minimal Dockerfile reader, shared by the deploy lint tests and the server tests that run the CPU image's
command sequence outside Docker."""

from __future__ import annotations

import json
from pathlib import Path

DOCKERFILE_CPU = Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile.cpu"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def only(path: Path, name: str) -> list[str]:
    return [args for word, args in instructions(path) if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r} must be exec (JSON) form"
    return value


def cpu_image_entrypoint() -> list[str]:
    """The CPU image's ENTRYPOINT (``vllm serve``): what ``docker run IMAGE <model> <args>`` executes."""
    return exec_form(only(DOCKERFILE_CPU, "ENTRYPOINT")[0])
