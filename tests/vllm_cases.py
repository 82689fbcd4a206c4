"""The checkpoints the vLLM tests serve, and how they are built. Adding a format is one line.

Converter formats are what ``moe-convert`` writes (one line per method: name -> CLI arguments); synthetic ones
come from ``synth.py`` and cover term kinds before a method produces them. Built checkpoints and HF reference
tokens go to a session folder, or to ``$MOE_LOWRANK_TEST_CACHE`` (reused between runs; for local work only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-pydocs"

CONVERTER_CASES: dict[str, list[str]] = {  # name -> moe-convert arguments
    "svd": ["--method", "svd", "--ratio", "0.3"],
    "moe-svd": ["--method", "moe-svd", "--ratio", "0.4"],  # 2 of 4 layers: shared V, 4 left slots
    "rs-moe": ["--method", "rs-moe", "--ratio", "0.4"],
    "mobe": ["--method", "mobe", "--ratio", "0.3", "-o", "steps=100"],  # silu basis mix on gate/up, dense down
    "rfid-moe": ["--method", "rfid-moe", "--ratio", "0.4"],  # ragged group ranks + residual on gate/up, down slots
}
# FP8 factors (format v2 scales, dequantized per use by the torch path): the offline engine only
FP8_CASES: dict[str, list[str]] = {"svd-fp8": ["--method", "svd", "--ratio", "0.3", "--factor-dtype", "fp8_e4m3"]}
# name -> {layer: specs.CASES name}; unlisted MoE layers would stay dense (the moe-svd case has dense layers; the
# EP test needs none: vLLM 0.32's CPU kernel for dense MoE layers crashes under expert parallelism)
SYNTH_CASES: dict[str, dict[int, str]] = {
    "synth-shared": {0: "moe_svd", 1: "mobe", 2: "svd", 3: "rfid"},
    "synth-units": {0: "rs_moe", 1: "mixed", 2: "mobe_identity", 3: "svd"},
}
ALL_CASES = [*CONVERTER_CASES, *FP8_CASES, *SYNTH_CASES]

PROMPTS = ["def fibonacci(n):", "import os\n", "The function returns", "Python's standard library"]
CHATS = [[{"role": "user", "content": "How do I open a file?"}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]]
MAX_TOKENS = 12
CONVERT_ARGS = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "64", "--seq-len", "256",
                "--dtype", "float32"]


def cache_dir(default: Path) -> Path:
    d = Path(os.environ.get("MOE_LOWRANK_TEST_CACHE", default))
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_case(name: str, root: Path) -> tuple[Path, Path]:
    """(compressed, dense export) of a case, built once under ``root``."""
    comp, dense = root / name, root / f"{name}-dense"
    if (dense / "config.json").is_file() and (comp / "config.json").is_file():
        return comp, dense
    if name in CONVERTER_CASES or name in FP8_CASES:
        convert(FIXTURE, comp, {**CONVERTER_CASES, **FP8_CASES}[name], dense)
    else:
        from synth import build

        build(FIXTURE, comp, SYNTH_CASES[name], dense_out=dense)
    return comp, dense


def convert(src: Path, out: Path, args: list[str], dense: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", *CONVERT_ARGS, *args, str(src), str(out),
           "--overwrite", *(["--export-dense", str(dense)] if dense else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"moe-convert failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")


def hf_greedy(dense: Path, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy continuations from transformers running the dense export in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            out.append(gen[0, len(ids):].tolist())
    return out


def prompt_ids(dense: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of PROMPTS (no special tokens added, as vLLM does for this tokenizer) and of CHATS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense)
    plain = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    chats = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
             for c in CHATS]
    return plain, chats


def references(name: str, root: Path) -> dict:
    """{"prompts": ids, "tokens": HF greedy, "chats": ids, "chat_tokens": HF greedy}, cached as JSON."""
    f = root / f"{name}-hf.json"
    if f.is_file():
        return json.loads(f.read_text())
    _, dense = build_case(name, root)
    plain, chats = prompt_ids(dense)
    ref = {"prompts": plain, "tokens": hf_greedy(dense, plain), "chats": chats}
    ref["chat_tokens"] = hf_greedy(dense, chats) if name in CONVERTER_CASES else []
    f.write_text(json.dumps(ref))
    return ref
