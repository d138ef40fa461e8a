"""Writing reduced checkpoints: atomically, with the record in `config.json`, loadable by transformers.

A uniform result is saved as the family's own architecture. A non-uniform one, or a merge with a tied router,
additionally gets a per-layer `layout` in its record, the loader code beside the weights (`modeling_moeprune.py`) and an `auto_map`
entry, so `trust_remote_code=True` loads it where hf_moeprune is not installed.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import nonuniform
from .moe_layers import MoELayer
from .records import RECORD_KEY, is_uniform, needs_loader

REMOTE_CODE_FILE = "modeling_moeprune.py"
logger = logging.getLogger(__name__)
AUTO_CLASS_BY_TASK = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM"}


def layer_layout(layer: MoELayer) -> dict[str, Any]:
    """Everything `nonuniform.resize_moe_layers` needs to rebuild this layer at its current size."""
    spec = layer.spec
    tied = layer.expert_map is not None  # the router keeps its E rows; the experts are resized to E'
    router_tensors = [f"{spec.router}.{name}" for name in layer.router_tensors()]
    expert_tensors = [] if tied else list(router_tensors)
    if spec.expert_layout == "fused":
        expert_tensors += [f"{spec.experts}.{t.name}" for t in layer.expert_tensor_specs()]
    pairs = [list(pair) for pair in layer.count_attribute_paths()]
    tied_entries = {
        "expert_map": layer.expert_map,
        "router_rows": layer.num_router_rows,
        "router_tensors": router_tensors,
        "router_count_attributes": [pair for pair in pairs if pair[0] != spec.experts],
    } if tied else {}
    return {
        **tied_entries,
        "num_experts": layer.num_experts,
        "top_k": layer.top_k,
        "router": spec.router,
        "experts": spec.experts,
        "expert_tensors": expert_tensors,
        "expert_modules": spec.experts if spec.expert_layout == "modules" else None,
        "expert_module_name": spec.expert_module_name,
        "count_attributes": [pair for pair in pairs if not tied or pair[0] == spec.experts],
        "top_k_attributes": [list(pair) for pair in layer.top_k_attribute_paths()],
    }


def remote_code_source(base_class: type, task: str) -> tuple[str, str]:
    """`nonuniform.py` plus the class that `auto_map` points at, bound to the family's base class."""
    wrapper_name = "MoEPrunedForCausalLM" if task == "causal-lm" else "MoEPrunedForSeq2SeqLM"
    return (
        inspect.getsource(nonuniform)
        + f"\n\nfrom transformers import {base_class.__name__} as _BaseModel  # noqa: E402\n\n"
        + f"{wrapper_name} = with_per_layer_experts(_BaseModel)\n"
        + f'{wrapper_name}.__name__ = {wrapper_name}.__qualname__ = "{wrapper_name}"\n'
    ), wrapper_name


STAGING_TAG = "moeprune-staging"
OLD_TAG = "moeprune-old"
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{STAGING_TAG}|{OLD_TAG})-(?P<pid>\d+)(?:-[^.]*)?")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
OVERWRITE_HINT = "choose a new folder or pass --overwrite / overwrite=True"


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, source: str | os.PathLike | None = None
) -> Path:
    """Refuse a destination whose replacement could destroy data the user did not ask to lose.

    Called before any expensive work (the CLI calls it before loading the model) and again before
    writing. An absent or empty folder is always fine; a non-empty one only with `overwrite` and only if
    it is an earlier hf_moeprune checkpoint. The source model, the current directory, its parents and
    files are never replaced. Returns the resolved destination.
    """
    output = Path(path).expanduser().resolve()
    for ancestor in (output, *output.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise FileExistsError(f"Output {path} cannot be a folder: {ancestor} is a file; choose a folder path.")
        if ancestor.exists():
            break
    cwd = Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        raise ValueError(
            f"Refusing to write into {output}: it is the current directory or a parent of it; choose a new folder."
        )
    source_dir = _local_folder(source)
    if source_dir is not None and (output == source_dir or output in source_dir.parents):
        raise ValueError(
            f"Refusing to write into {output}: the model was loaded from {source_dir}; choose a new folder."
        )
    if not output.exists() or not any(output.iterdir()):
        return output
    if not overwrite:
        raise FileExistsError(f"Output folder {output} exists and is not empty; {OVERWRITE_HINT}.")
    if not is_moeprune_checkpoint(output):
        raise ValueError(
            f"Refusing to replace {output}: it is not an hf_moeprune checkpoint (no {RECORD_KEY!r} record in "
            "config.json), so overwrite=True does not apply; choose a new folder."
        )
    return output


def is_moeprune_checkpoint(folder: Path) -> bool:
    """True for a folder whose config.json carries the hf_moeprune record (what `overwrite` may replace)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get(RECORD_KEY), dict)


def _local_folder(source: str | os.PathLike | None) -> Path | None:
    """The resolved folder a model was loaded from, or None for a Hub id or an in-memory model."""
    if not source or not Path(source).expanduser().is_dir():
        return None
    return Path(source).expanduser().resolve()


def reclaim_leftovers(output: Path) -> None:
    """Remove the staging and old-copy folders that killed saves to `output` left beside it.

    A folder whose process is still alive is reported, not touched. A dead save's old copy is restored when
    the destination is missing: the save died between the two renames of the fallback swap.
    """
    for folder in sorted(output.parent.glob(f".{glob.escape(output.name)}.moeprune-*")):
        match = _LEFTOVER.fullmatch(folder.name)
        if match is None or match["name"] != output.name or not folder.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_alive(pid):
            logger.warning("Leaving %s in place: process %d that wrote it is still running.", folder, pid)
        elif match["kind"] == OLD_TAG and not output.exists():
            os.replace(folder, output)
            logger.warning("Restored %s from %s, left by an interrupted save (process %d).", output, folder, pid)
        else:
            shutil.rmtree(folder)
            logger.warning("Removed %s, left by an interrupted save (process %d).", folder, pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc >= 2.28, Linux >= 3.15), or None where this platform has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where libc, kernel or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_folder(staging: Path, output: Path) -> None:
    """Put `staging` at `output` so that one of the two complete checkpoints is always there."""
    if not output.exists() or not any(output.iterdir()):
        os.replace(staging, output)  # an empty folder is replaced by one rename
        return
    if _exchange(staging, output):
        shutil.rmtree(staging)  # now holds the old checkpoint
        return
    # No renameat2 (not Linux, old glibc, or a filesystem without RENAME_EXCHANGE): two renames, with a
    # moment where only the old copy exists, under a name `reclaim_leftovers` restores after a crash.
    old = output.parent / staging.name.replace(STAGING_TAG, OLD_TAG, 1)
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old)


def atomic_directory(
    output_dir: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Run `write(staging)` into a fresh sibling folder, then swap it into place.

    The destination is checked first (see `check_output_dir`). An exception (or interrupt) while writing
    removes the staging folder and leaves `output_dir` as it was; a kill -9 leaves a
    `.NAME.moeprune-staging-PID-*` folder that the next save to the same destination removes.
    """
    output = check_output_dir(output_dir, overwrite=overwrite, source=source)
    output.parent.mkdir(parents=True, exist_ok=True)
    reclaim_leftovers(output)
    output = check_output_dir(output_dir, overwrite=overwrite, source=source)  # a restored old copy counts
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.{STAGING_TAG}-{os.getpid()}-", dir=output.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; transformers' folders follow the umask
        write(staging)
        _files_follow_umask(staging)
        _replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _files_follow_umask(folder: Path) -> None:
    """safetensors writes its files 0600; a checkpoint to serve or publish is readable as the umask allows,
    as every other file of the folder is."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def save_checkpoint(
    model: nn.Module,
    layers: Sequence[MoELayer],
    record: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    task: str = "causal-lm",
    extra_files: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
    write_weights: Callable[[Path], None] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save `model` with its record; non-uniform results get the per-layer loader. Returns the folder.

    `overwrite` and `source` (the folder the model was loaded from) are as in `check_output_dir`.
    `write_weights(folder)` puts weights already written elsewhere (the streaming pipeline's shards) in
    place of `save_pretrained`'s; the config and generation config are then written on their own.
    """
    config = model.config
    record = dict(record)
    record["uniform"] = is_uniform(record)
    custom = needs_loader(record)
    previous_auto_map = getattr(config, "auto_map", None)
    if not custom:
        record.pop("layout", None)
    else:
        record["layout"] = {layer.path: layer_layout(layer) for layer in layers}
    base_class = _transformers_base(type(model))
    # Remote code can only rebuild classes that transformers itself ships; others (our native Arctic) load
    # through hf_moeprune, which registers them with the Auto classes.
    portable = base_class is not None
    if portable:
        remote_source, wrapper_name = remote_code_source(base_class, task)

    def write(folder: Path) -> None:
        setattr(config, RECORD_KEY, record)
        if custom and portable:
            config.auto_map = {AUTO_CLASS_BY_TASK[task]: f"{REMOTE_CODE_FILE[:-3]}.{wrapper_name}"}
        try:
            if write_weights is None:
                model.save_pretrained(folder, **save_kwargs)
            else:
                write_weights(folder)
                config.save_pretrained(folder)
                if getattr(model, "generation_config", None) is not None and model.can_generate():
                    model.generation_config.save_pretrained(folder)
        finally:
            if previous_auto_map is None and hasattr(config, "auto_map"):
                del config.auto_map
            elif previous_auto_map is not None:
                config.auto_map = previous_auto_map
        if custom and portable:
            (folder / REMOTE_CODE_FILE).write_text(remote_source)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if extra_files is not None:
            extra_files(folder)

    return atomic_directory(output_dir, write, overwrite=overwrite, source=source)


def _transformers_base(model_class: type) -> type | None:
    """The first class in the MRO that transformers exports as a model with a head, else None."""
    import transformers

    for cls in model_class.__mro__:
        exported = getattr(transformers, cls.__name__, None) is cls
        if exported and issubclass(cls, transformers.PreTrainedModel) and cls is not transformers.PreTrainedModel:
            return cls
    return None
