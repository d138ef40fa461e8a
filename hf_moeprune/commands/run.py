"""`hf-moeprune run RECIPE.yaml`: run a list of steps (merge, then prune, ...) as llm-compressor recipes do."""

from __future__ import annotations

import argparse

from ._recipe import CALIBRATION_FIELDS, add_run_arguments, execute

NAME = "run"
HELP = "Run a recipe file (model, calibration, a list of steps) and save one checkpoint."
DESCRIPTION = (
    "Run the steps of a YAML recipe in order through the same code as `prune` and `merge`, and save one\n"
    "checkpoint. `prune`/`merge --save-recipe FILE` and every generated model card give such a file.\n\n"
    "recipe.yaml:\n"
    "  model: path/or/hub-id            # default: the bundled testbed model\n"
    "  calibration: {source: data.jsonl, seq_len: 256, max_sequences: 128}   # default: the bundled sample\n"
    "  steps:\n"
    "    - {method: uncurl, experts_per_layer: 4}\n"
    "    - {method: stun, expert_sparsity: 0.25, weight_sparsity: 0.4}\n\n"
    "example:\n"
    "  hf-moeprune run recipe.yaml --output OUT"
)
RECIPE_KEYS = ("model", "calibration", "steps")
DEFAULTS = {"seq_len": 256, "batch_size": 8, "max_sequences": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="The recipe file.")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    recipe = read_recipe(args.recipe)
    calibration = dict(recipe.get("calibration") or {})
    unknown = sorted(set(calibration) - {"source", *CALIBRATION_FIELDS[1:]})
    if unknown:
        raise ValueError(f"{args.recipe}: unknown calibration key(s) {unknown}; known: source, "
                         f"{', '.join(CALIBRATION_FIELDS[1:])}.")
    args.model = recipe.get("model")
    for field in CALIBRATION_FIELDS:
        value = calibration.get("source" if field == "calibration" else field, DEFAULTS.get(field))
        setattr(args, field, value)
    return execute(args, steps_of(recipe, args.recipe))


def read_recipe(path: str) -> dict:
    """The recipe's mapping, with one-line errors for a missing file, bad YAML or unknown keys."""
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe {path}: no such file.")
    try:
        recipe = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"Recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(recipe, dict) or not recipe.get("steps"):
        raise ValueError(f"Recipe {path} needs a `steps:` list, e.g. steps: [{{method: frequency, experts_per_layer: 4}}].")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"Recipe {path}: unknown key(s) {unknown}; known: {', '.join(RECIPE_KEYS)}.")
    return recipe


def steps_of(recipe: dict, path: str) -> list:
    import dataclasses

    from ..config import MoEPruneConfig

    known = {field.name for field in dataclasses.fields(MoEPruneConfig)}
    if not isinstance(recipe["steps"], list) or not all(isinstance(step, dict) for step in recipe["steps"]):
        raise ValueError(f"Recipe {path}: `steps` must be a list of mappings with a `method` each.")
    configs = []
    for number, step in enumerate(recipe["steps"], 1):
        unknown = sorted(set(step) - known)
        if unknown:
            raise ValueError(f"Recipe {path}, step {number}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}.")
        try:
            configs.append(MoEPruneConfig.from_dict(step))
        except (TypeError, ValueError) as error:
            raise ValueError(f"Recipe {path}, step {number}: {error}") from error
    return configs
