"""What a benchmark run measures, as a dataclass light enough for `hf-moeprune bench --help` (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchArgs:
    """What to measure. Each field is one command-line option (`--batch-size` for `batch_size`)."""

    model: str = field(metadata={"help": "Checkpoint folder or Hub id of the original model."})
    compare: list[str] = field(
        default_factory=list, metadata={"help": "Reduced checkpoints to compare with it."}
    )
    expert_parallel: bool = field(default=False, metadata={"help": "Shard experts across the processes."})
    ep_engine: str = field(
        default="auto",
        metadata={
            "help": "auto (transformers' EP where it accepts the model, else native), transformers, native."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Global batch (sequences), split across processes."})
    seq_len: int = field(default=256, metadata={"help": "Prompt length in tokens."})
    decode_tokens: int = field(default=32, metadata={"help": "Greedy decode steps timed after each prefill."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs before measuring."})
    repeats: int = field(default=5, metadata={"help": "Timed prefill+decode runs."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    threads: int = field(
        default=0,
        metadata={
            "help": "torch threads per process; 0 = CPU cores / local processes, so launches of any size "
            "use the same cores."
        },
    )
    text: str | None = field(
        default=None,
        metadata={"help": "Text file to take prompts from (needs a tokenizer); default random ids."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random prompts."})
    profile: bool = field(default=True, metadata={"help": "Profile one run for the communication breakdown."})
    check_logits: bool = field(
        default=False,
        metadata={
            "help": "Compare the prefill logits with a one-process run on rank 0 (max |diff| in the JSON)."
        },
    )
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even where GPUs exist."})
