"""Make a bundled Qwen3-MoE fixture from real text: corpus -> held-out split -> tokenizer -> training -> checkpoint.

    python scripts/make_fixture.py --out fixtures/qwen3-moe-perldocs            # CPU, the recorded settings
    python scripts/make_fixture.py --out /tmp/fx --device cuda                  # same, on a GPU (bf16 autocast)
    python scripts/make_fixture.py --verify fixtures/qwen3-moe-perldocs         # CPU: transformers vs own model

Steps (each from this file alone, with torch + tokenizers; transformers only for ``--verify``):
1. Corpus: ``--deb PKG`` runs ``apt-get download PKG`` and ``dpkg -x`` into a scratch folder (no install) and takes
   the files matching ``--glob``; ``--corpus DIR`` takes them from a folder instead.
2. Held-out split by name hash: a file whose md5(relative path) mod ``--holdout`` is 0 is never trained on;
   those files (sorted) make ``eval.txt``. ``calib.txt`` is ``--calib-bytes`` of training-split files.
3. Tokenizer: byte-level BPE of ``--vocab`` tokens trained on the training split (``--tokenizer FILE`` reuses one);
   ids 0/1/2 are <|endoftext|>, <|im_start|>, <|im_end|>; the ChatML template sits in tokenizer_config.json.
4. Training: a compact Qwen3-MoE written here (RMSNorm, q/k-norm attention with RoPE and GQA, softmax top-k router
   with ``norm_topk_prob``, experts batched as one padded bmm per projection rather than a loop over experts),
   AdamW with warmup + cosine, router load-balancing loss (Switch Transformer, Fedus et al. 2021, as transformers'
   ``load_balancing_loss_func``). float32 on CPU, bf16 autocast on CUDA.
5. Save in the Hugging Face Qwen3-MoE layout (``model.layers.i.mlp.experts.j.{gate,up,down}_proj.weight``) in
   bfloat16, one ``model.safetensors``; the folder holds 7 files: config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json, calib.txt, eval.txt, train_args.json.
``--verify DIR`` (also run after training unless ``--no-verify``) loads the checkpoint with transformers and with this
file's model, scores the project's perplexity windows (first 16,384 tokens of eval.txt, 256-token windows, float32)
with both, fails if they differ by more than 0.1%, and records the perplexity in train_args.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------- corpus, split, tokenizer
def corpus_files(a: argparse.Namespace, scratch: Path) -> tuple[Path, list[Path]]:
    """(root, files): the documents, from a Debian package (downloaded and unpacked, not installed) or a folder."""
    if a.corpus:
        root = Path(a.corpus)
    else:
        subprocess.run(["apt-get", "download", a.deb], cwd=scratch, check=True, capture_output=True)
        deb = next(scratch.glob(f"{a.deb}_*.deb"))
        root = scratch / "root"
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    files, seen = [], set()
    for p in sorted(root.glob(a.glob)):  # links and duplicate contents once (perldelta.pod is a copy)
        digest = hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        if digest and p.stat().st_size and digest not in seen:
            seen.add(digest)
            files.append(p)
    if not files:
        raise SystemExit(f"make_fixture: error: no file matches {a.glob!r} under {root}")
    return root, files


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


# ---------------------------------------------------------------- model (Qwen3-MoE, as transformers computes it)
def init_params(c: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """HF names, except experts stacked: ``...mlp.experts.{gate,up}_proj`` [E, I, H], ``down_proj`` [E, H, I]."""
    H, I, E = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    hd, L = c["head_dim"], c["num_hidden_layers"]
    nq, nkv, V = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["vocab_size"]
    std, out_std = 0.02, 0.02 / math.sqrt(2 * L)
    rnd = lambda *s, sd=std: torch.randn(*s, generator=gen) * sd  # noqa: E731
    p = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": torch.ones(H), "lm_head.weight": rnd(V, H)}
    for i in range(L):
        pre = f"model.layers.{i}."
        p |= {pre + "input_layernorm.weight": torch.ones(H), pre + "post_attention_layernorm.weight": torch.ones(H),
              pre + "self_attn.q_proj.weight": rnd(nq, H), pre + "self_attn.k_proj.weight": rnd(nkv, H),
              pre + "self_attn.v_proj.weight": rnd(nkv, H), pre + "self_attn.o_proj.weight": rnd(H, nq, sd=out_std),
              pre + "self_attn.q_norm.weight": torch.ones(hd), pre + "self_attn.k_norm.weight": torch.ones(hd),
              pre + "mlp.gate.weight": rnd(E, H), pre + "mlp.experts.gate_proj": rnd(E, I, H),
              pre + "mlp.experts.up_proj": rnd(E, I, H), pre + "mlp.experts.down_proj": rnd(E, H, I, sd=out_std)}
    return p


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def moe(x: torch.Tensor, p: dict, pre: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (out [N, H], load-balancing loss). Experts as one padded bmm per projection: the N*k (token,
    expert) pairs sorted by expert into [E, C, H], C = the largest expert's count (no token dropped)."""
    wg, wu, wd = p[pre + "experts.gate_proj"], p[pre + "experts.up_proj"], p[pre + "experts.down_proj"]
    E, N = wg.shape[0], x.shape[0]
    probs = F.softmax((x @ p[pre + "gate.weight"].T).float(), dim=-1)  # [N, E]
    w, idx = probs.topk(k, dim=-1)  # [N, k]
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E)
    e_sorted = flat[order]
    pos = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[e_sorted]
    tok = order // k
    buf = x.new_zeros(E, int(counts.max()), x.shape[1])
    buf[e_sorted, pos] = x[tok]
    h = F.silu(torch.bmm(buf, wg.transpose(1, 2))) * torch.bmm(buf, wu.transpose(1, 2))  # [E, C, I]
    y = torch.bmm(h, wd.transpose(1, 2))[e_sorted, pos] * w.reshape(-1)[order, None]  # [N*k, H]
    out = torch.zeros_like(x).index_add(0, tok, y)
    aux = E * (counts.float() / N * probs.mean(0)).sum()
    return out, aux


def forward(p: dict, c: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (logits [B, T, V] float32, mean router load-balancing loss)."""
    B, T = ids.shape
    hd, nh, nkv, eps = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    inv = 1.0 / (c["rope_parameters"]["rope_theta"] ** (torch.arange(0, hd, 2, device=ids.device).float() / hd))
    fr = torch.outer(torch.arange(T, device=ids.device).float(), inv)
    cos, sin = torch.cat((fr, fr), -1).cos(), torch.cat((fr, fr), -1).sin()
    x = F.embedding(ids, p["model.embed_tokens.weight"])
    aux = x.new_zeros((), dtype=torch.float32)
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        h = rms(x, p[pre + "input_layernorm.weight"], eps)
        at = pre + "self_attn."
        q = rms((h @ p[at + "q_proj.weight"].T).view(B, T, nh, hd), p[at + "q_norm.weight"], eps)  # [B, T, nh, hd]
        kk = rms((h @ p[at + "k_proj.weight"].T).view(B, T, nkv, hd), p[at + "k_norm.weight"], eps)
        v = (h @ p[pre + "self_attn.v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        q, kk = rope(q.transpose(1, 2), cos, sin), rope(kk.transpose(1, 2), cos, sin)
        rep = nh // nkv  # GQA: each KV head serves nh / nkv query heads
        o = F.scaled_dot_product_attention(q, kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        x = x + o.transpose(1, 2).reshape(B, T, nh * hd) @ p[pre + "self_attn.o_proj.weight"].T
        h = rms(x, p[pre + "post_attention_layernorm.weight"], eps)
        m, a = moe(h.reshape(B * T, -1), p, pre + "mlp.", c["num_experts_per_tok"])
        x, aux = x + m.view(B, T, -1), aux + a
    x = rms(x, p["model.norm.weight"], eps)
    return (x @ p["lm_head.weight"].T).float(), aux / c["num_hidden_layers"]


def nll(p: dict, c: dict, windows: torch.Tensor, batch: int = 8) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits, _ = forward(p, c, chunk)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total, count


# ---------------------------------------------------------------- checkpoint
def hf_config(a: argparse.Namespace) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "hidden_act": "silu", "hidden_size": a.hidden, "intermediate_size": 4 * a.hidden,
            "moe_intermediate_size": a.inter, "num_experts": a.experts, "num_experts_per_tok": a.topk,
            "norm_topk_prob": True, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "rope_theta": 10000.0, "router_aux_loss_coef": a.aux, "output_router_logits": False,
            "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": False, "use_cache": True,
            "vocab_size": a.vocab, "initializer_range": 0.02, "dtype": "bfloat16"}


def save(p: dict, c: dict, out: Path) -> None:
    """bf16 safetensors in the HF per-expert layout (written here: the GPU machine may lack ``safetensors``)."""
    sd = {}
    for name, t in p.items():
        t = t.detach().to("cpu", torch.bfloat16)
        if ".mlp.experts." in name:
            for j in range(t.shape[0]):
                sd[name.replace("experts.", f"experts.{j}.") + ".weight"] = t[j].contiguous()
        else:
            sd[name] = t.contiguous()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(sd):
        n = sd[name].numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(sd[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in sorted(sd):
            f.write(sd[name].view(torch.int16).numpy().tobytes())
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")


def load(ckpt: Path) -> tuple[dict, dict]:
    """(float32 params with experts stacked, config) of a checkpoint written by ``save``."""
    from safetensors.torch import load_file

    c = json.loads((ckpt / "config.json").read_text())
    sd = {k: v.float() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    p = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(c["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            pre = f"model.layers.{i}.mlp.experts."
            p[pre + proj] = torch.stack([sd[f"{pre}{j}.{proj}.weight"] for j in range(c["num_experts"])])
    return p, c


def verify(ckpt: Path, tolerance: float = 1e-3) -> dict:
    """Perplexity of the project's eval windows with transformers and with this file's model (float32, CPU)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm_moe_lowrank.evaluation.perplexity import eval_windows, transformers_nll

    windows = eval_windows(ckpt, ckpt / "eval.txt")
    hf_total, hf_count = transformers_nll(ckpt, windows)
    own_total, own_count = nll(*load(ckpt), windows)
    hf_ppl, own_ppl = math.exp(hf_total / hf_count), math.exp(own_total / own_count)
    res = {"dense_ppl_transformers": round(hf_ppl, 4), "dense_ppl_own_model": round(own_ppl, 4),
           "eval_windows": int(windows.shape[0])}
    if abs(hf_ppl / own_ppl - 1) > tolerance:
        raise SystemExit(f"make_fixture: error: {ckpt}: transformers perplexity {hf_ppl:.4f} differs from this "
                         f"script's model {own_ppl:.4f} by more than {100 * tolerance:g}%")
    args = ckpt / "train_args.json"
    if args.is_file():
        args.write_text(json.dumps(json.loads(args.read_text()) | res, indent=1) + "\n")
    return res


# ---------------------------------------------------------------- main
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "calib.txt", "eval.txt")


def prepare(a: argparse.Namespace, prep: Path) -> dict:
    """Corpus -> split -> tokenizer -> token ids, into ``prep``: the 4 text files of the fixture and ``ids.pt``
    (training and validation token streams; the validation files, md5 mod N == 1, are neither trained on nor in
    eval.txt: they pick the best state)."""
    prep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root, files = corpus_files(a, Path(scratch))
        docs = {f.relative_to(root).as_posix(): f.read_text(encoding="utf-8", errors="replace") for f in files}
    bucket = {n: int(hashlib.md5(n.encode()).hexdigest(), 16) % a.holdout for n in docs}
    train = [d for n, d in docs.items() if bucket[n] > 1]
    held = [d for n, d in docs.items() if bucket[n] == 0]
    val = [d for n, d in docs.items() if bucket[n] == 1]
    if not held or not train or not val:
        raise SystemExit(f"make_fixture: error: --holdout {a.holdout} leaves {len(held)} held-out, {len(val)} "
                         f"validation and {len(train)} training files of {len(docs)}")
    per_file = a.eval_bytes // len(held)  # every held-out file contributes, not just the first
    (prep / "eval.txt").write_text("\n\n".join(d[:per_file] for d in held), encoding="utf-8")
    calib, size = [], 0
    for d in train[:: max(1, len(train) // 64)]:  # spread over the corpus, not its first files
        if size >= a.calib_bytes:
            break
        calib.append(d[: a.calib_bytes - size])
        size += len(calib[-1])
    (prep / "calib.txt").write_text("\n\n".join(calib), encoding="utf-8")
    if a.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(a.tokenizer)
    else:
        tok = train_tokenizer(train, a.vocab)
    tok.save(str(prep / "tokenizer.json"))
    (prep / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "bos_token": SPECIAL[0],
         "eos_token": SPECIAL[0], "pad_token": SPECIAL[0], "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    eos = tok.token_to_id(SPECIAL[0])
    stream = lambda ds: torch.tensor([i for d in ds for i in tok.encode(d).ids + [eos]], dtype=torch.int16)  # noqa
    info = {"vocab": tok.get_vocab_size(), "corpus_files": len(docs), "train_files": len(train),
            "val_files": len(val), "held_out_files": len(held)}
    torch.save({"train": stream(train), "val": stream(val), "info": info}, prep / "ids.pt")
    return info


def train(a: argparse.Namespace, prep: Path, out: Path) -> dict:
    """Train on ``prep``'s token ids (torch only) and write the fixture's 7 files into ``out``."""
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    saved = torch.load(prep / "ids.pt")
    data, val, info = saved["train"].long(), saved["val"].long(), saved["info"]
    a.vocab = info["vocab"]
    c = hf_config(a)
    dev = torch.device(a.device)
    gen = torch.Generator().manual_seed(a.seed)
    n_val = min(32, (len(val) - 1) // a.seq)
    val_w = val[: n_val * a.seq].view(n_val, a.seq).to(dev)
    p = {k: v.to(dev).requires_grad_() for k, v in init_params(c, gen).items()}
    opt = torch.optim.AdamW([{"params": [v for v in p.values() if v.dim() >= 2], "weight_decay": 0.1},
                             {"params": [v for v in p.values() if v.dim() < 2], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    log, best, t1 = [], (math.inf, -1, None), time.time()
    for step in range(a.steps):
        if a.max_seconds and time.time() - t1 > a.max_seconds:
            print(f"stopping at step {step}: --max-seconds {a.max_seconds} reached", flush=True)
            break
        starts = torch.randint(0, len(data) - a.seq - 1, (a.batch,), generator=gen)
        batch = torch.stack([data[s: s + a.seq + 1] for s in starts]).to(dev)
        with torch.autocast(**amp):
            logits, aux = forward(p, c, batch[:, :-1])
        lm = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (lm + a.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        sched.step()
        last = step == a.steps - 1 or (a.max_seconds and time.time() - t1 > a.max_seconds)
        if (step + 1) % a.log_every == 0 or last:
            with torch.autocast(**amp):
                vl = nll(p, c, val_w)
            row = {"step": step + 1, "loss": round(lm.item(), 4), "aux": round(aux.item(), 4),
                   "val_loss": round(vl[0] / vl[1], 4), "s": round(time.time() - t1, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
            if row["val_loss"] < best[0]:  # the best state on the validation files (not eval.txt)
                best = (row["val_loss"], step + 1, {k: v.detach().clone() for k, v in p.items()})
    save(best[2], c, out)
    for f in TEXT_FILES:
        shutil.copyfile(prep / f, out / f)
    meta = {k: v for k, v in vars(a).items() if k not in ("verify", "no_verify", "prepare", "from_prep", "out")}
    meta |= info | {"train_tokens": len(data), "steps_done": log[-1]["step"],
                    "tokens_seen": log[-1]["step"] * a.batch * a.seq,
                    "params": sum(v.numel() for v in p.values()), "best_step": best[1], "best_val_loss": best[0],
                    "train_s": round(time.time() - t1, 1), "torch": torch.__version__,
                    "log": log[:: max(1, len(log) // 20)],
                    "saved_dtype": "bfloat16 (trained in float32" + (", bf16 autocast)" if dev.type == "cuda" else ")")}
    (out / "train_args.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (created; its 7 files are overwritten)")
    ap.add_argument("--verify", metavar="DIR", help="only verify an existing fixture (transformers vs own model)")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers check after training")
    ap.add_argument("--prepare", metavar="DIR", help="only corpus, split, tokenizer and token ids, into DIR")
    ap.add_argument("--from", dest="from_prep", metavar="DIR", help="train from a --prepare folder (torch only)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--deb", default="perl-doc", help="Debian package whose files make the corpus")
    src.add_argument("--corpus", help="a folder of text files instead of --deb")
    ap.add_argument("--glob", default="**/*.pod", help="which files of the package / folder are documents")
    ap.add_argument("--holdout", type=int, default=40, help="hold out 1 file in N by md5 of its path")
    ap.add_argument("--calib-bytes", type=int, default=350_000)
    ap.add_argument("--eval-bytes", type=int, default=150_000)
    ap.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.02, help="router load-balancing loss coefficient")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop training after this long (best state kept)")
    ap.add_argument("--log-every", type=int, default=100, help="steps between logs and validation")
    a = ap.parse_args(argv)
    if not (a.out or a.verify or a.prepare):
        ap.error("give --out DIR (make a fixture), --prepare DIR or --verify DIR")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch sees no CUDA device")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.prepare:
        print(json.dumps(prepare(a, Path(a.prepare))))
    if a.out:
        with tempfile.TemporaryDirectory() as tmp:
            prep = Path(a.from_prep) if a.from_prep else Path(tmp)
            if not a.from_prep:
                prepare(a, prep)
            meta = train(a, prep, Path(a.out))
        print(f"trained {meta['params']:,} parameters on {meta['tokens_seen']:,} tokens in {meta['train_s']} s; "
              f"best validation loss {meta['best_val_loss']} at step {meta['best_step']}")
    if a.verify or (a.out and not a.no_verify):
        print(json.dumps(verify(Path(a.verify or a.out))))


if __name__ == "__main__":
    main()
