"""Train tokopt's reference causal LM on the Python standard library's own source.

The corpus is on every machine with no download: the ``*.py`` files of the running
interpreter's stdlib (tests and site-packages excluded). Files are split by a hash of their
relative path, so the split does not depend on the order the file system lists them in.

    python scripts/train_reference_lm.py --out models/reference-lm

Deterministic (fixed seed, fixed step count, one thread by default), resumable (a checkpoint
every ``--save-every`` steps in ``--work``), prints progress. Writes an HF folder
(config, safetensors, tokenizer) and ``heldout.txt``, then reports held-out perplexity against
unigram and bigram baselines on the same tokens (``eval.json``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def corpus_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    skip = ("site-packages", "test", "tests", "idle_test", "__phello__")
    keep = [f for f in files if not any(part in skip for part in f.relative_to(root).parts[:-1])]
    return [(str(f.relative_to(root)), f) for f in keep]


def split(files):
    """About 4% of files (by path hash) are held out."""
    train, held = [], []
    for rel, path in files:
        bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100
        (held if bucket < 4 else train).append((rel, path))
    return train, held


def read(files) -> str:
    return "".join(f"# file: {rel}\n" + p.read_text(encoding="utf-8", errors="replace") + "\n<|endoftext|>\n"
                   for rel, p in files)


def train_tokenizer(text: str, vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], model_max_length=1024)


def make_config(vocab: int, ctx: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=ctx,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) + peak * 0.02


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    """Non-overlapping windows of ``ctx`` tokens over the whole held-out stream."""
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        chunk = ids[i:i + ctx + 1]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def ngram_baselines(train: torch.Tensor, held: torch.Tensor, vocab: int) -> dict:
    """Add-one unigram and interpolated (0.9/0.1 with unigram) bigram perplexities."""
    uni = torch.bincount(train, minlength=vocab).double() + 1
    uni /= uni.sum()
    uni_ppl = math.exp(-uni[held].log().mean().item())
    pair = train[:-1] * vocab + train[1:]
    big = torch.bincount(pair, minlength=vocab * vocab).double().view(vocab, vocab)
    rows = big.sum(1, keepdim=True)
    cond = torch.where(rows > 0, big / rows.clamp(min=1), uni[None, :])
    p = 0.9 * cond[held[:-1], held[1:]] + 0.1 * uni[held[1:]]
    return {"unigram": uni_ppl, "bigram": math.exp(-p.log().mean().item())}


def evaluate(out: Path, ctx: int, threads: int) -> dict:
    """Held-out perplexity of the shipped model, with the n-gram baselines, from scratch."""
    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    train_files, held_files = split(corpus_files())
    held_text = (out / "heldout.txt").read_text(encoding="utf-8")
    held = torch.tensor(tok(held_text)["input_ids"], dtype=torch.long)
    train = torch.tensor(tok(read(train_files))["input_ids"], dtype=torch.long)
    result = {"heldout_ppl": perplexity(model, held, ctx),
              **{f"{k}_ppl": v for k, v in ngram_baselines(train, held, len(tok)).items()},
              "heldout_tokens": len(held), "ctx": ctx}
    print(json.dumps(result, indent=1))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/reference-lm")
    ap.add_argument("--work", default=".cache/reference-lm-train")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true", help="re-measure the model in --out; train nothing")
    args = ap.parse_args(argv)
    if args.eval_only:
        return evaluate(Path(args.out), args.ctx, args.threads)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_files, held_files = split(corpus_files())
    train_text, held_text = read(train_files), read(held_files)
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(train_text, args.vocab)
        tok.save_pretrained(tok_dir)
    ids_path = work / "ids.pt"
    if ids_path.exists():
        train_ids, held_ids = torch.load(ids_path).values()
    else:
        train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
        held_ids = torch.tensor(tok(held_text)["input_ids"], dtype=torch.long)
        torch.save({"train": train_ids, "held": held_ids}, ids_path)
    print(f"corpus: {len(train_files)} train files / {len(train_ids):,} tokens, "
          f"{len(held_files)} held-out files / {len(held_ids):,} tokens")

    # Sequence length ramps up: short windows are cheap and teach most of what there is to
    # learn; the last quarter runs at full context so RoPE positions up to ctx are trained.
    model = LlamaForCausalLM(make_config(args.vocab, args.ctx))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, ckpt = 0, work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}")
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    while step < args.steps:
        seq = args.ctx if step >= args.steps * 3 // 4 else args.ctx // 4
        batch = max(1, args.tokens_per_step // seq)
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,))
        x = torch.stack([train_ids[s:s + seq + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", seq=seq)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "rng": torch.get_rng_state()}, ckpt)
    bar.close()

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "heldout.txt").write_text(held_text, encoding="utf-8")
    ppl = perplexity(model, held_ids, args.ctx)
    result = {"heldout_ppl": ppl, **{f"{k}_ppl": v for k, v in ngram_baselines(train_ids, held_ids, args.vocab).items()},
              "train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "steps": args.steps,
              "ctx": args.ctx, "threads": args.threads, "seconds_this_run": round(time.time() - started)}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
