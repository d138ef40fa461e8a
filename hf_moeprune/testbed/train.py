"""Train a small Mixtral-architecture MoE from scratch on the testbed corpus (the testbed models).

The shipped testbeds were made with `scripts/testbed/train_v2.sh` (see `benchmarks/results/testbed.md` for
tokens, time, losses and per-domain figures), which runs, for 8 and then 32 experts (balance 0.1 for 32):

    python -m hf_moeprune.testbed.train --experts 8 --tokens 8000000 --batch-size 16 --seq-len 256 \
        --tokenizer hf_moeprune/testbed/data/tokenizer --documents runs/corpus_v2/train.jsonl.gz \
        --balance-coef 0.01 --router-z-coef 0.001 --autocast bfloat16 --threads 1 --checkpoint-every 100 \
        --resume --output runs/testbed_v2/mixtral-8e

(the two runs ran at the same time, one torch thread each). `runs/corpus_v2/train.jsonl.gz` is the train split
written by `scripts/testbed/build_corpus.py`; held-out documents in it are skipped.

The 8- and 32-expert testbeds share the tokenizer, backbone, expert size, seed, data order and token budget, so a
32-expert model reduced to 8 can be compared with the 8-expert one trained from scratch (the central
comparison of UNCURL, https://arxiv.org/abs/2409.01483).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from .data import Document, read_documents, split_of

RESUME_DIR = "resume"
STATE_FILE = "state.pt"

# Same for every testbed; only `num_local_experts` differs.
BACKBONE = dict(
    hidden_size=256,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.02,
    rope_theta=10000.0,
)


def train_tokenizer(documents: list[Document], vocab_size: int, output: Path):
    """Byte-level BPE trained on the given (training) documents, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((d.text for d in documents), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1 << 30,  # documents are tokenized whole and cut into windows by the caller
    )
    tokenizer.save_pretrained(output)
    return tokenizer


def token_stream(documents: list[Document], tokenizer, seed: int) -> torch.Tensor:
    """All documents in a seeded order, each followed by the end-of-text token, as one 1-D tensor."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    ids = tokenizer([d.text for d in order], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.cat([torch.tensor([*row, eos], dtype=torch.long) for row in ids])


def build_model(num_experts: int, tokenizer, seed: int, **overrides):
    """A freshly initialised MixtralForCausalLM with the testbed backbone (fields in `overrides` replace it)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        **{**BACKBONE, **overrides},
        num_local_experts=num_experts,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MixtralForCausalLM(config)


def _save(model, output: Path, dtype: torch.dtype) -> None:
    saved = copy.deepcopy(model).to(dtype)
    saved.config.output_router_logits = False
    saved.save_pretrained(output)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (https://arxiv.org/abs/2101.03961, eq. 4-6) of each layer, averaged
    over layers: num_experts * sum_i f_i * P_i, with f_i the share of the top-k choices and P_i the mean router
    probability of expert i; 1.0 when balanced.

    transformers' Mixtral loss pools the counts of all layers before this product, so one layer can leave experts
    unused while another overuses them: with it the 32-expert testbed had most experts of every layer under 1%
    of the held-out tokens after 0.1M training tokens, whatever its coefficient."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
        share = torch.zeros(experts).scatter_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        losses.append(experts * (share / chosen.numel() * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """ST-MoE router z-loss (https://arxiv.org/abs/2202.08906): mean squared log-sum-exp of the router logits,
    averaged over layers; keeps router logits small so routing stays trainable."""
    return torch.stack([logits.float().logsumexp(dim=-1).pow(2).mean() for logits in router_logits]).mean()


def _fingerprint(args: argparse.Namespace, steps: int, stream: torch.Tensor) -> dict:
    """What must match for a saved state to be resumed: the run's shape and its exact token stream."""
    return {
        "experts": args.experts,
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "balance_coef": args.balance_coef,
        "router_z_coef": args.router_z_coef,
        "autocast": args.autocast,
        "stream_tokens": int(stream.numel()),
        "stream_sha256": hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
    }


def save_state(
    path: Path, fingerprint: dict, step: int, model, optimizer, scheduler, generator, history
) -> None:
    """Everything needed to continue exactly: weights (float32), optimizer, scheduler, the data sampler's
    generator (the data position), torch's RNG and the loss history; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": fingerprint,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(path: Path, fingerprint: dict, model, optimizer, scheduler, generator) -> tuple[int, dict]:
    """Restore a `save_state` file into the given objects; the step to continue from and the history."""
    state = torch.load(path, weights_only=True)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise ValueError(
            f"{path} belongs to another run (differs in {', '.join(changed)}); use its original command "
            "or another --output."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["history"]


def usage_sample(path: str, count: int, characters: int = 2000) -> list[Document]:
    """`count` documents spread evenly over the file (so over its domains), each cut to its first `characters`
    characters: a cheap, fixed probe of expert usage."""
    documents = read_documents(path)
    chosen = documents[:: max(1, len(documents) // count)][:count]
    return [Document(d.name, d.text[:characters], d.domain, d.topic) for d in chosen]


@torch.no_grad()
def expert_usage(model, tokenizer, documents: list[Document]) -> dict:
    """Share of the routed (top-k) choices that each layer's least- and most-used expert gets on `documents`."""
    from .report import routing_counts

    model.eval()
    shares = routing_counts(model, tokenizer, documents).sum(0)
    shares = shares / shares.sum(-1, keepdim=True)
    return {
        "min_share_per_layer": [round(float(v), 5) for v in shares.min(-1).values],
        "max_share_per_layer": [round(float(v), 5) for v in shares.max(-1).values],
        "experts_under_1pct": int((shares < 0.01).sum()),
    }


def train(args: argparse.Namespace) -> dict:
    """Train one testbed (or only its tokenizer) as described by the parsed command line."""
    from transformers import AutoTokenizer

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log_file = Path(args.log_file) if args.log_file else output / "train.log"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    documents = [d for d in read_documents(args.documents) if split_of(d.name) != "heldout"]
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizer.save_pretrained(output)
    else:
        tokenizer = train_tokenizer(documents, args.vocab_size, output)
    if args.tokenizer_only:
        return {"tokenizer": str(output), "vocab_size": len(tokenizer), "training_documents": len(documents)}
    stream = token_stream(documents, tokenizer, args.seed)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    model = build_model(args.experts, tokenizer, args.seed, **overrides)
    model.config.output_router_logits = True  # adds transformers' load-balancing loss to `loss`
    if args.balance_coef:  # replaced by the per-layer loss, so the pooled one must not be added
        model.router_aux_loss_coef = model.config.router_aux_loss_coef = 0.0
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.save_dtype]

    block = args.seq_len * args.batch_size
    steps = args.steps or max(1, args.tokens // block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    history = {"losses": [], "aux_losses": [], "seconds": 0.0}
    fingerprint = _fingerprint(args, steps, stream)
    state_file = output / RESUME_DIR / STATE_FILE
    first = 0
    if args.resume and state_file.exists():
        first, history = load_state(state_file, fingerprint, model, optimizer, scheduler, generator)
        log(f"resumed from {state_file} at step {first}/{steps}")
    usage_documents = (
        usage_sample(args.usage_documents, args.usage_max_documents) if args.usage_documents else []
    )
    last = min(steps, args.stop_at_step) if args.stop_at_step else steps
    resumed_seconds = history["seconds"]
    start = time.time() - resumed_seconds
    model.train()
    for step in range(first, last):
        offsets = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([stream[o : o + args.seq_len] for o in offsets.tolist()])
        # bf16 matmuls (fp32 weights and optimizer): about 1.25x the tokens/s of fp32 on a CPU with avx512_bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16"):
            out = model(input_ids=batch, labels=batch)
            loss = out.loss
            if args.balance_coef:
                balance = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
                loss = loss + args.balance_coef * balance
                history.setdefault("balance_losses", []).append(float(balance.detach()))
            if args.router_z_coef:
                loss = loss + args.router_z_coef * router_z_loss(out.router_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
        lm_loss = float(out.loss.detach()) - model.router_aux_loss_coef * aux
        history["losses"].append(lm_loss)
        history["aux_losses"].append(aux)
        history["seconds"] = time.time() - start
        done = step + 1
        if step % args.log_every == 0 or done == steps:
            rate = (done - first) * block / max(1e-9, history["seconds"] - resumed_seconds)
            log(
                f"step {done}/{steps} lm_loss {lm_loss:.3f} aux {aux:.3f} "
                + (f"balance {history['balance_losses'][-1]:.3f} " if args.balance_coef else "")
                + f"lr {scheduler.get_last_lr()[0]:.2e} "
                f"tokens/s {rate:.0f} elapsed {history['seconds']:.0f}s"
            )
        if args.save_every and done % args.save_every == 0 and done < steps:
            _save(model, output, dtype)
        periodic = args.checkpoint_every and done % args.checkpoint_every == 0
        if (periodic or done == last) and done < steps:
            save_state(state_file, fingerprint, done, model, optimizer, scheduler, generator, history)
            if usage_documents:
                log(f"step {done} expert usage {json.dumps(expert_usage(model, tokenizer, usage_documents))}")
            model.train()
    if last < steps:
        log(f"stopped at step {last}/{steps} (--stop-at-step); resume with --resume")
        return {"stopped_at_step": last, "steps": steps}
    seconds = history["seconds"]
    losses, aux_losses = history["losses"], history["aux_losses"]
    model.eval()
    _save(model, output, dtype)
    tail = max(1, min(50, steps // 10))
    report = {
        "experts": args.experts,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_tokens": steps * block,
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seconds": round(seconds, 1),
        "threads": args.threads,
        f"final_lm_loss_mean_last_{tail}_steps": round(sum(losses[-tail:]) / tail, 4),
        f"final_aux_loss_mean_last_{tail}_steps": round(sum(aux_losses[-tail:]) / tail, 4),
        "training_documents": len(documents),
        "training_split_tokens": int(stream.numel()),
        "seed": args.seed,
        "balance_coef": args.balance_coef,
        "router_z_coef": args.router_z_coef,
        "saved_dtype": args.save_dtype,
        "autocast": args.autocast,
        "command": "python -m hf_moeprune.testbed.train " + " ".join(args.argv),
    }
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="Experts per layer (num_local_experts).")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="Training token budget.")
    parser.add_argument("--steps", type=int, default=0, help="Number of steps; overrides --tokens when > 0.")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate (AdamW, cosine to 10%%).")
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="BPE vocabulary when a tokenizer is trained."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=0, help="Also save the model every N steps.")
    parser.add_argument(
        "--balance-coef",
        type=float,
        default=0.0,
        help="Weight of the per-layer load-balancing loss; when > 0 it replaces transformers' pooled one.",
    )
    parser.add_argument("--router-z-coef", type=float, default=0.0, help="Weight of the router z-loss.")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="Save the full training state to OUTPUT/resume/state.pt every N steps (0: never).",
    )
    parser.add_argument(
        "--resume", action="store_true", help="Continue from OUTPUT/resume/state.pt when it exists."
    )
    parser.add_argument(
        "--stop-at-step", type=int, default=0, help="Save the state and stop after this step (time slicing)."
    )
    parser.add_argument("--log-file", help="Append the log here (default OUTPUT/train.log).")
    parser.add_argument(
        "--usage-documents",
        help="A .jsonl.gz of held-out documents on which expert usage is logged at every checkpoint.",
    )
    parser.add_argument("--usage-max-documents", type=int, default=70)
    parser.add_argument(
        "--autocast",
        default="none",
        choices=["none", "bfloat16"],
        help="Mixed precision: run the forward pass under torch.autocast in this dtype (weights stay float32).",
    )
    parser.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokenizer", help="Reuse this tokenizer folder instead of training one.")
    parser.add_argument(
        "--tokenizer-only", action="store_true", help="Train and save the tokenizer, then stop."
    )
    parser.add_argument(
        "--documents",
        required=True,
        help="Train on the documents of this .jsonl.gz (held-out ones skipped), e.g. the train split written by "
        "scripts/testbed/build_corpus.py.",
    )
    parser.add_argument(
        "--config-overrides", help="JSON of MixtralConfig fields (the tests use a tiny backbone)."
    )
    parser.add_argument(
        "--output", required=True, help="Folder for the checkpoint, tokenizer and training_report.json."
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    report = train(args)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
