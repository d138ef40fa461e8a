"""Arguments shared by `prune` and `merge`: the model, the recipe and the calibration set."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def add_recipe_arguments(parser: argparse.ArgumentParser, default_method: str, methods: list[str]) -> None:
    """The arguments of `prune` / `merge`; `methods` are the names listed in `--method`'s help."""
    parser.add_argument("--model", metavar="DIR|HUB_ID",
                        help="Checkpoint folder or Hub id (default: the bundled 8-expert testbed model).")
    parser.add_argument("--method", default=default_method, metavar="NAME",
                        help=f"Method name: {', '.join(methods)} (`hf-moeprune methods` lists their options).")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--experts-per-layer", type=int, metavar="N", help="Experts kept in every MoE layer.")
    target.add_argument("--expert-sparsity", type=float, metavar="FRACTION",
                        help="Share of all experts to remove, in [0, 1).")
    target.add_argument("--num-experts-total", type=int, metavar="N", help="Experts kept over all MoE layers.")
    parser.add_argument("--adaptive", action="store_true",
                        help="Let the method choose per-layer counts (a non-uniform checkpoint).")
    parser.add_argument("--weight-sparsity", type=float, metavar="FRACTION",
                        help="Unstructured sparsity in [0, 1): of the experts' weights for wanda/owl (--option "
                        "targets=... widens it), of every linear of each decoder layer for stun.")
    parser.add_argument("--unstructured", choices=["wanda", "owl"], help="Unstructured phase after expert pruning.")
    parser.add_argument("--nm", metavar="N:M", help="N:M pattern for the unstructured phase, e.g. 2:4.")
    parser.add_argument("--top-k", type=int, metavar="K", help="New router top-k (only to go below the model's).")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="Seed of the methods' random choices (e.g. the random baseline, k-means); the same seed "
                        "gives identical files.")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="Method option (value parsed as JSON when possible); repeatable.")
    data = parser.add_argument_group("calibration data")
    data.add_argument("--calibration", metavar="FILE|FOLDER|DATASET",
                      help="A data file (.txt with blank-line separated documents, .json, .jsonl, .csv, .tsv, "
                      ".parquet), a folder of such files, a `save_to_disk` folder or a Hub dataset id "
                      "(default: the bundled seven-domain calibration sample).")
    data.add_argument("--split", metavar="NAME",
                      help="Split of a folder, saved dataset or Hub dataset (default: train).")
    data.add_argument("--text-column", metavar="NAME",
                      help="Column holding the text (default: text; messages with --chat-template).")
    data.add_argument("--num-samples", type=int, metavar="N", help="Use only the first N rows (default: all).")
    data.add_argument("--chat-template", action="store_true",
                      help="Rows are chat messages ([{role, content}, ...]): render them with the tokenizer's "
                      "chat template, as an instruct model sees its input.")
    data.add_argument("--seq-len", type=int, default=256, metavar="TOKENS",
                      help="Tokens per packed calibration sequence.")
    data.add_argument("--batch-size", type=int, default=8, metavar="N", help="Sequences per calibration forward pass.")
    data.add_argument("--max-sequences", type=int, default=128, metavar="N",
                      help="At most this many packed sequences (tokens used: at most seq-len x max-sequences).")
    add_run_arguments(parser)
    parser.add_argument("--save-recipe", metavar="FILE",
                        help="After a successful run, write its recipe (model, calibration, steps) as YAML for "
                        "`hf-moeprune run FILE`.")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Output, placement and streaming arguments: the same for `prune`, `merge` and `run`."""
    placement = parser.add_argument_group("precision, placement and streaming")
    placement.add_argument("--device", default="cpu",
                           help="Where layers run: cpu, cuda, cuda:N or auto (a GPU when there is one).")
    placement.add_argument("--dtype", help="Compute and output dtype: bfloat16, float16 or float32 "
                           "(default: the checkpoint's own).")
    placement.add_argument("--max-memory", metavar="DEV=SIZE,...",
                           help="In-memory path: per-device limits for device_map='auto', e.g. 0=70GiB,cpu=200GiB.")
    placement.add_argument("--trust-remote-code", action="store_true",
                           help="Allow the checkpoint's own modelling code (only for checkpoints you trust).")
    mode = placement.add_mutually_exclusive_group()
    mode.add_argument("--streaming", action="store_true", help="Stream decoder layers from the safetensors shards "
                      "(one layer in memory at a time). Default: when the checkpoint would not fit in memory twice.")
    mode.add_argument("--in-memory", action="store_true", help="Load the whole model even if it is large.")
    placement.add_argument("--resume", action="store_true",
                           help="Streaming: continue an interrupted run of the same command after its last layer.")
    placement.add_argument("--activations", choices=["auto", "memory", "disk"], default="auto",
                           help="Streaming: where calibration hidden states wait between layers; auto spills them to "
                           "files beside the output when one copy would take over a quarter of the free memory.")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="Folder for the reduced checkpoint (new or empty).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --output if it holds an earlier hf_moeprune checkpoint (never other data).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    parser.add_argument("--base-model", metavar="HUB_ID",
                        help="The Hub id the input checkpoint came from, named as base_model in the card "
                        "(default: the input when it is a Hub id; a local folder's path is never published).")


def recipe_from_args(args: argparse.Namespace):
    from ..config import MoEPruneConfig

    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    nm = _parse_nm(args.nm) if args.nm else None
    return MoEPruneConfig(
        method=args.method, experts_per_layer=args.experts_per_layer, expert_sparsity=args.expert_sparsity,
        num_experts_total=args.num_experts_total, adaptive=args.adaptive, weight_sparsity=args.weight_sparsity,
        unstructured=args.unstructured, nm_pattern=nm, top_k=args.top_k, seed=args.seed, method_options=options,
    )


def _parse_nm(text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ValueError(f"--nm expects N:M with whole numbers, e.g. 2:4; got {text!r}.")
    return int(n), int(m)


def read_calibration(args: argparse.Namespace) -> tuple[list, str]:
    """The calibration rows and their description: from --calibration, else the bundled sample."""
    if args.calibration is None:
        for flag in ("split", "text_column", "chat_template"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} applies to --calibration data; pass --calibration too.")
        return default_calibration(), "hf_moeprune bundled calibration sample (seven domains)"
    from ..calibration import read_calibration_source

    return _with_cli_names(read_calibration_source, args.calibration, split=args.split,
                           text_column=args.text_column, num_samples=args.num_samples,
                           chat_template=args.chat_template)


def looks_local(name: str) -> bool:
    """True for what can only be a folder (a Hub id is `name` or `owner/name`, never `./x`, `/x` or `a/b/c`)."""
    return (
        name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1) or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
    )


def check_model_path(name: str) -> None:
    """A missing local folder is reported as such, before transformers tries the Hub with it."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {name}: is a file, not a checkpoint folder.")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: the folder has no config.json, so it is not a checkpoint.")
    elif looks_local(name):
        raise FileNotFoundError(f"--model {name}: no such folder.")


def check_chat_template(model_path: str) -> None:
    """--chat-template needs the model's tokenizer to have one; found out before the weights load."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"--chat-template: cannot load the tokenizer of {model_path} ({error}).") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat-template: the tokenizer of {model_path} has no chat template; drop --chat-template "
                         "or use an instruct model.")


def check_recipe_arguments(args: argparse.Namespace, merge: bool) -> None:
    """Everything that can be checked without the weights, in the CLI's own words."""
    from ..methods import get_method

    for flag in ("seq_len", "batch_size", "max_sequences", "num_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    method_class = _with_cli_names(get_method, args.method)
    verb = "merge" if merge else "prune"
    wanted = ("merge",) if merge else ("prune", "unstructured")
    if method_class.kind not in wanted:
        other = "merge" if method_class.kind == "merge" else "prune"
        raise ValueError(f"--method {args.method} is a {method_class.kind} method, not a {verb} method: use "
                         f"`hf-moeprune {other}`.")


def default_model() -> str:
    from ..testbed import default_model_path

    return str(default_model_path())


def default_calibration() -> list[str]:
    from ..testbed import calibration_documents

    return [document.text for document in calibration_documents()]


def run_recipe(args: argparse.Namespace, merge: bool) -> int:
    """`prune` / `merge`: one step."""
    check_recipe_arguments(args, merge)
    return execute(args, [_with_cli_names(recipe_from_args, args)])


CALIBRATION_FIELDS = ("calibration", "split", "text_column", "num_samples", "chat_template", "seq_len",
                      "batch_size", "max_sequences")


def recipe_of(args: argparse.Namespace, configs: list) -> dict[str, Any]:
    """The run as a recipe file's content: what `hf-moeprune run` needs to repeat it exactly."""
    calibration = {("source" if name == "calibration" else name): getattr(args, name) for name in CALIBRATION_FIELDS}
    return {
        "model": args.model,
        "calibration": {key: value for key, value in calibration.items() if value not in (None, False)},
        "steps": [config.to_dict() for config in configs],
    }


def execute(args: argparse.Namespace, configs: list) -> int:
    """Run `configs` in order on `args.model` and save to `args.output`: checks first, then one load (or one
    streaming pass per step), then one atomic save."""
    from transformers import AutoConfig

    from ..checkpoint import check_output_dir
    from ..families import family_for_model_type
    from ..methods import get_method
    from ..pipeline.streaming import resolve_device, resolve_dtype

    if args.no_progress:
        from ..progress import disable_progress_bars

        disable_progress_bars()
    for flag in ("seq_len", "batch_size", "max_sequences"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    methods = [_with_cli_names(get_method(config.method), config) for config in configs]  # option errors first
    calibrated = any(method.needs_calibration for method in methods)
    rows, description = read_calibration(args) if calibrated else (None, None)
    model_path = args.model or default_model()
    check_model_path(model_path)
    if args.chat_template:
        check_chat_template(model_path)
    _with_cli_names(check_output_dir, args.output, overwrite=args.overwrite, source=model_path)  # before loading
    device = resolve_device(args.device)
    if args.max_memory:
        parse_max_memory(args.max_memory)
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    resolve_dtype(args.dtype, model_config)
    family = family_for_model_type(model_config.model_type)
    streaming = args.streaming or (not args.in_memory and should_stream(model_path, model_config))
    if args.resume and not streaming:
        raise ValueError("--resume continues streaming runs only; add --streaming.")
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_sequences=args.max_sequences,
                   num_samples=args.num_samples, chat_template=args.chat_template, description=description)
    recipe = recipe_of(args, configs)
    if args.base_model:
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.base_model)
        except ValueError as error:
            raise ValueError(f"--base-model {args.base_model!r} is not a Hub model id (org/name).") from error
    if streaming:
        folder = _stream_steps(model_path, args, configs, rows, device, recipe, options)
        record = json.loads((folder / "config.json").read_text())["moeprune"]
    else:
        model = _load_in_memory(model_path, family.task, args)
        onload = device if device.type != "cpu" and not args.max_memory else None  # layer by layer onto the GPU
        for config, method in zip(configs, methods, strict=True):
            step = model.merge_experts if method.kind == "merge" else model.prune_experts
            _with_cli_names(step, config, calibration=rows, device=onload, **options)
        model.record["recipe"] = recipe
        if args.base_model:
            model.record["base_model"] = args.base_model
        folder = model.save_pretrained(args.output, overwrite=args.overwrite)
        record = model.record
    if getattr(args, "save_recipe", None):
        Path(args.save_recipe).write_text(recipe_yaml(recipe))
    from .inspect import print_table

    print_table(record)
    print(f"Saved {folder}")
    return 0


def recipe_yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _stream_steps(model_path, args, configs, rows, device, recipe, options) -> Path:
    """One streaming run per step; a step's output is the next one's input, kept beside the output until the
    last step is saved (so `--resume` also skips finished steps)."""
    import shutil

    from ..checkpoint import is_moeprune_checkpoint
    from ..pipeline.streaming import reduce_checkpoint

    output = Path(args.output).expanduser().resolve()
    steps_dir = output.parent / f".{output.name}.moeprune-steps"
    source = Path(model_path)
    for index, config in enumerate(configs):
        last = index == len(configs) - 1
        target = output if last else steps_dir / f"step-{index}"
        if not last and args.resume and is_moeprune_checkpoint(target):
            source = target
            continue
        folder = _with_cli_names(
            reduce_checkpoint, source, target, config, calibration=rows, device=device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite or not last, resume=args.resume,
            activations=args.activations, recipe=recipe if last else None, base_model=args.base_model if last else None, **options,
        )
        source = folder
    shutil.rmtree(steps_dir, ignore_errors=True)
    return folder


def should_stream(model_path: str, model_config: Any) -> bool:
    """Stream a local decoder-only safetensors checkpoint that would not fit in memory twice over
    (loading plus the copy the in-memory path makes while saving)."""
    from ..memory import available_memory
    from ..pipeline.shards import checkpoint_bytes

    folder = Path(model_path).expanduser()
    if not folder.is_dir() or getattr(model_config, "is_encoder_decoder", False):
        return False
    try:
        size = checkpoint_bytes(folder)
    except ValueError:  # no safetensors: only the in-memory loader reads it
        return False
    return 2.5 * size > available_memory()


def parse_max_memory(text: str) -> dict[int | str, str]:
    """`0=70GiB,cpu=200GiB` -> {0: "70GiB", "cpu": "200GiB"} (accelerate's `max_memory`)."""
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        device, sep, size = item.strip().partition("=")
        if not sep or not size.strip():
            raise ValueError(f"--max-memory expects DEVICE=SIZE pairs such as 0=70GiB,cpu=200GiB; got {text!r}.")
        device = device.strip()
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def _load_in_memory(model_path: str, task: str, args: argparse.Namespace):
    from ..modeling import AutoMoEPruneModelForCausalLM, AutoMoEPruneModelForSeq2SeqLM

    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.max_memory:  # spread over the GPUs (and host memory) with accelerate's device map
        kwargs.update(device_map="auto", max_memory=parse_max_memory(args.max_memory))
    auto = AutoMoEPruneModelForSeq2SeqLM if task == "seq2seq-lm" else AutoMoEPruneModelForCausalLM
    return auto.from_pretrained(model_path, **kwargs)


_CLI_NAMES = {
    "experts_per_layer": "--experts-per-layer", "expert_sparsity": "--expert-sparsity",
    "num_experts_total": "--num-experts-total", "weight_sparsity": "--weight-sparsity", "top_k": "--top-k",
    "nm_pattern": "--nm", "MoEPruneConfig(top_k=...)": "--top-k", "method_options": "--option",
    "unstructured=": "--unstructured", "call merge_experts()": "use `hf-moeprune merge`",
    "call prune_experts()": "use `hf-moeprune prune`", "Registered methods": "Choose --method from",
    "pass --overwrite / overwrite=True": "pass --overwrite", "calibration=": "--calibration ",
    "chat_template=True": "--chat-template", "text_column=": "--text-column ", "split=": "--split",
    "num_samples": "--num-samples",
}


def _with_cli_names(function, *args, **kwargs):
    """Call `function`; a refusal it raises is re-raised, same type, with the API's names replaced by CLI flags."""
    try:
        return function(*args, **kwargs)
    except (ValueError, FileExistsError) as error:
        message = str(error)
        for api, cli in sorted(_CLI_NAMES.items(), key=lambda item: -len(item[0])):
            message = message.replace(api, cli)
        raise type(error)(message) from error
