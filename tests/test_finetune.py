"""Recovery fine-tuning: the loss falls, distillation is the KL to the teacher, every result format trains and
reloads with the trained logits, pruned zeros stay zero, an interrupted run resumes to the same model, bad input
is one line before any model loads, and the record and card say what was done."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny_model, logits_of
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

import hf_moeprune.finetuning.run as finetune_run
from hf_moeprune import AutoMoEPruneModelForCausalLM, FinetuneArgs, MoEPruneConfig, finetune
from hf_moeprune.calibration import prepare_calibration
from hf_moeprune.cli import main
from hf_moeprune.finetuning.trainer import DistillationTrainer, language_model_loss
from hf_moeprune.hub import read_recipes_from_card

IDS = torch.randint(4, 90, (2, 24), generator=torch.Generator().manual_seed(5))
CALIB = torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(6))
FAST = dict(max_steps=4, seq_len=32, batch_size=2, learning_rate=1e-3, save_steps=1000, logging_steps=1)
REDUCTIONS = {
    "uniform": ("prune_experts", MoEPruneConfig(method="frequency", experts_per_layer=3)),
    "non-uniform": ("prune_experts", MoEPruneConfig(method="stun", expert_sparsity=0.25)),
    "tied-router": ("merge_experts", MoEPruneConfig(method="uncurl", experts_per_layer=3,
                                                    method_options={"router": "tied"})),
    "wanda": ("prune_experts", MoEPruneConfig(method="wanda", weight_sparsity=0.5)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Training steps of a tiny model are a few milliseconds of work: on a busy machine a second intra-op thread
    costs several times that in waiting (measured here: 20 s instead of 3.7 s for one fine-tune)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reduced(tmp_path, tokenizer, kind: str):
    """A reduced tiny Mixtral saved with its tokenizer, as `hf-moeprune prune/merge` would leave it."""
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tokenizer)
    step, config = REDUCTIONS[kind]
    getattr(model, step)(config, calibration=CALIB)
    return model.save_pretrained(tmp_path / kind)


def _trainer(tmp_path, student, teacher, alpha):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True)
    return DistillationTrainer(model=student, args=args, teacher=teacher, alpha=alpha, temperature=2.0)


def test_loss_goes_down_on_repeated_text(tmp_path, tiny_tokenizer):
    text = ["The committee met on Tuesday to discuss the budget for next year."] * 8
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tiny_tokenizer)
    ids = torch.cat(prepare_calibration(text, tiny_tokenizer, seq_len=32).batches)
    before = language_model_loss(logits_of(model.model, ids), ids).item()
    args = FinetuneArgs(**{**FAST, "max_steps": 20, "learning_rate": 3e-3, "alpha": 0.0})
    trained = finetune(model, text, tmp_path / "out", args, teacher=None, progress=False)
    after = language_model_loss(logits_of(trained.model, ids), ids).item()
    assert after < 0.7 * before


def test_distillation_is_zero_against_itself_and_mixes_the_tempered_kl_otherwise(tmp_path):
    student = build_tiny_model("mixtral")
    same = _trainer(tmp_path, student, copy.deepcopy(student), alpha=1.0)
    assert abs(same.compute_loss(student, {"input_ids": IDS}).item()) < 1e-6

    teacher = build_tiny_model("mixtral", seed=1)
    trainer = _trainer(tmp_path, student, teacher, alpha=0.25)
    loss = trainer.compute_loss(student, {"input_ids": IDS})
    with torch.no_grad():
        p_teacher = F.softmax(logits_of(teacher, IDS) / 2.0, dim=-1)
        log_student = F.log_softmax(logits_of(student, IDS) / 2.0, dim=-1)
        kl = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean() * 4.0
        lm = F.cross_entropy(logits_of(student, IDS)[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
    assert kl > 1e-3
    torch.testing.assert_close(loss.detach(), 0.75 * lm + 0.25 * kl, rtol=1e-4, atol=1e-6)
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]
    assert logged["lm_loss"] == pytest.approx(lm.item(), abs=1e-4)
    assert logged["distill_loss"] == pytest.approx(kl.item(), abs=1e-4)


@pytest.mark.parametrize("kind", ["uniform", "non-uniform", "tied-router"])
def test_each_result_format_trains_and_reloads_with_the_trained_logits(kind, tmp_path, tiny_tokenizer, sample_texts):
    folder = _reduced(tmp_path, tiny_tokenizer, kind)
    original = AutoMoEPruneModelForCausalLM.from_pretrained(folder)
    trained = finetune(str(folder), sample_texts, tmp_path / "out", FinetuneArgs(**FAST), teacher=None, progress=False)

    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = logits_of(trained.model, IDS)
    torch.testing.assert_close(logits_of(reloaded.model, IDS), expected, rtol=0, atol=0)
    assert (expected - logits_of(original.model, IDS)).abs().max() > 1e-3  # it did train
    counts = [layer.num_experts for layer in original.moe_layers()]
    assert [layer.num_experts for layer in reloaded.moe_layers()] == counts
    assert [layer.expert_map for layer in reloaded.moe_layers()] == [layer.expert_map for layer in original.moe_layers()]
    assert (len(set(counts)) > 1) == (kind == "non-uniform")
    assert (original.moe_layers()[0].expert_map is not None) == (kind == "tied-router")
    record = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]
    assert record["layers"] == original.record["layers"]
    assert record["steps"][:-1] == original.record["steps"] and record["steps"][-1]["kind"] == "finetune"
    if kind == "uniform":
        assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")).__name__ == "MixtralForCausalLM"


def test_wanda_zeros_stay_zero(tmp_path, tiny_tokenizer, sample_texts):
    folder = _reduced(tmp_path, tiny_tokenizer, "wanda")
    before = dict(AutoMoEPruneModelForCausalLM.from_pretrained(folder).model.named_parameters())
    finetune(str(folder), sample_texts, tmp_path / "out", FinetuneArgs(**{**FAST, "learning_rate": 1e-2}),
             teacher=None, progress=False)
    after = dict(AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out").model.named_parameters())
    record = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]
    assert record["weight_sparsity"]
    for name in record["weight_sparsity"]:
        zero = before[name] == 0
        assert zero.float().mean() > 0.4
        assert torch.all(after[name][zero] == 0), name
        assert (after[name][~zero] != before[name][~zero]).float().mean() > 0.5  # the rest did train


class _InterruptAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_tokenizer, sample_texts):
    folder = _reduced(tmp_path, tiny_tokenizer, "uniform")
    args = FinetuneArgs(**{**FAST, "max_steps": 6, "save_steps": 4})
    whole = finetune(str(folder), sample_texts, tmp_path / "whole", args, teacher=str(folder), progress=False)

    with pytest.raises(KeyboardInterrupt):
        finetune(str(folder), sample_texts, tmp_path / "cut", args, teacher=str(folder), progress=False,
                 callbacks=[_InterruptAt(4)])
    staging = tmp_path / f".cut.{finetune_run.STAGING_TAG}"
    assert not (tmp_path / "cut").exists() and (staging / "checkpoint-4").is_dir()
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(str(folder), sample_texts, tmp_path / "cut", args, teacher=str(folder), progress=False)
    other = FinetuneArgs(**{**FAST, "max_steps": 6, "save_steps": 4, "learning_rate": 2e-3})
    with pytest.raises(ValueError, match="different model, data or arguments"):
        finetune(str(folder), sample_texts, tmp_path / "cut", other, teacher=str(folder), progress=False, resume=True)

    resumed = finetune(str(folder), sample_texts, tmp_path / "cut", args, teacher=str(folder), progress=False,
                       resume=True)
    assert not staging.exists()
    for (name, value), (_, expected) in zip(resumed.model.state_dict().items(), whole.model.state_dict().items(),
                                            strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert resumed.record["steps"][-1] == whole.record["steps"][-1]


def test_cli_records_the_fine_tune_and_the_card_says_so(tmp_path, tiny_tokenizer, sample_texts):
    base = tmp_path / "base"
    build_tiny_model("mixtral").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    data = tmp_path / "task.txt"
    data.write_text("\n\n".join(sample_texts))
    common = ["--seq-len", "32", "--no-progress"]
    assert main(["prune", "--model", str(base), "--method", "frequency", "--experts-per-layer", "3",
                 "--calibration", str(data), "--output", str(tmp_path / "pruned"), *common]) == 0
    assert main(["finetune", "--model", str(tmp_path / "pruned"), "--data", str(data), "--max-steps", "3",
                 "--batch-size", "2", "--output", str(tmp_path / "out"), *common]) == 0

    step = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]["steps"][-1]
    assert step["kind"] == "finetune" and step["teacher"] == str(base)  # default: the model it was pruned from
    assert step["config"]["max_steps"] == 3 and step["tokens_seen"] == 3 * 2 * 32
    expected = prepare_calibration(str(data), tiny_tokenizer, seq_len=32, batch_size=2, max_sequences=None)
    assert step["calibration"]["token_sha256"] == expected.sha256()
    assert step["calibration"]["description"].startswith(str(data))
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"then fine-tuned for 3 steps on {step['calibration']['description']} (distilled from `base`)" in card
    assert "fine-tuned" in card.split("---")[1]  # a tag
    assert [config.method for config in read_recipes_from_card(card)] == ["frequency"]


def _boom(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("case", ["no model", "max steps", "alpha", "scheduler", "no data", "no teacher",
                                  "teacher vocabulary", "into the input", "non-empty output"])
def test_bad_input_is_one_line_before_any_model_loads(case, tmp_path, tiny_tokenizer, sample_texts, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(finetune_run, "_load", _boom)
    monkeypatch.setattr(finetune_run, "_load_teacher", _boom)
    model = tmp_path / "model"
    build_tiny_model("mixtral").save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    output = tmp_path / "out"
    extra, wanted = {
        "no model": (["--model", str(tmp_path / "missing")], "no such folder"),
        "max steps": (["--max-steps", "0"], "--max-steps must be a whole number >= 1"),
        "alpha": (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
        "scheduler": (["--lr-scheduler", "steep"], "--lr-scheduler must be one of"),
        "no data": (["--data", str(tmp_path / "missing.txt")], "missing.txt"),
        "no teacher": (["--teacher", str(tmp_path / "gone")], "--teacher"),
        "teacher vocabulary": (["--teacher", str(tmp_path / "other")], "vocabulary"),
        "into the input": (["--output", str(model)], "Refusing to write into"),
        "non-empty output": ([], "exists and is not empty"),
    }[case]
    if case == "teacher vocabulary":
        build_tiny_model("mixtral", vocab_size=128).save_pretrained(tmp_path / "other")
    if case == "non-empty output":
        output.mkdir()
        (output / "notes.txt").write_text("keep me")
    argv = ["finetune", "--model", str(model), "--output", str(output), "--seq-len", "32", "--no-progress", *extra]
    before = sorted(path.name for path in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-moeprune: error:") and wanted in err[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    if case == "non-empty output":
        assert [path.name for path in output.iterdir()] == ["notes.txt"]
