"""`hf-moeprune methods`: every registered method, one line each, with its options, types and defaults."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

NAME = "methods"
HELP = "List the registered methods (name, kind, whether they need calibration data, paper) and their options."

# A static copy of the registry's names and kinds, so `prune --help` / `merge --help` can list methods without
# importing torch. tests/test_cli_help.py checks that it matches the registry.
METHOD_KINDS: dict[str, str] = {
    "frequency": "prune",
    "naee": "prune",
    "random": "prune",
    "reap": "prune",
    "stun": "prune",
    "hc-smoe": "merge",
    "mc-smoe": "merge",
    "uncurl": "merge",
    "owl": "unstructured",
    "wanda": "unstructured",
}


def methods_of_kind(*kinds: str) -> list[str]:
    """Names in the static table with one of these kinds, sorted."""
    return sorted(name for name, kind in METHOD_KINDS.items() if kind in kinds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=["prune", "merge", "unstructured"], help="Only methods of this kind.")


def option_lines(method: type) -> list[str]:
    """`name: type = default  help` for each field of the method's `Options` dataclass (none if it has none)."""
    options = getattr(method, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return []
    lines = []
    for f in dataclasses.fields(options):
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_text = f.metadata.get("help", "")
        lines.append(f"{f.name}: {type_name} = {_default(f)!r}" + (f"  {help_text}" if help_text else ""))
    return lines


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<required>"


def _needs_data(method: type) -> str:
    # a class attribute, or a property when it depends on the options (e.g. STUN's unstructured phase)
    value = method.needs_calibration
    return ("yes" if value else "no") if isinstance(value, bool) else "depends"


def run(args: argparse.Namespace) -> int:
    from ..methods import registered_methods

    methods = sorted(registered_methods().items())
    if args.kind:
        methods = [(name, cls) for name, cls in methods if cls.kind == args.kind]
    width = max(len(name) for name, _ in methods)
    print(f"{'method':{width}s}  {'kind':12s} {'data':7s} name / paper")
    for name, cls in methods:
        print(f"{name:{width}s}  {cls.kind:12s} {_needs_data(cls):7s} {cls.pretty_name}"
              + (f"  {cls.paper}" if cls.paper else ""))
        for line in option_lines(cls):
            print(f"{'':{width}s}    option {line}")
    print("\nSet an option with --option KEY=VALUE (repeatable) on prune or merge.")
    return 0
