"""A new user's path through ZOTrainer: save_model into output_dir then `ftlab replay`, a base
model folder without a tokenizer, a datasets.Dataset with PromptCollator, the TrainingArguments
a zeroth-order step cannot honour, and rerunning into the same output_dir."""

import json
import shutil
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.errors import FtlabError
from ftlab.integrations.hf import PromptCollator, ZOArguments, ZOTrainer, run_files_dir
from ftlab.models import load_model, load_trained
from ftlab.train import replay_run
from ftlab.zo import ZO_OPTIMIZERS, ZOOptimizer, ZOSettings
from ftlab.zo.trajectory import TrajectoryLog

from run_fixtures import SPEC, tiny_run_data

STEPS = 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _args(out, **kw):
    kw = {"save_strategy": "no", "seed": 3, **kw}
    return TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=5e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, **kw)


def _lora(model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _trainable(module):
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad}


def _train(module, out, tokenizer, **kw):
    zo_args = kw.pop("zo_args", ZOArguments(zo=ZOSettings(eps=1e-2)))
    trainer = ZOTrainer(model=module, args=_args(out), zo_args=zo_args, train_dataset=tiny_run_data().splits.train,
                        data_collator=PromptCollator(tokenizer, SPEC), **kw)
    trainer.train()
    return trainer


def _replay_cli(run_dir, out):
    result = CliRunner().invoke(app, ["replay", str(run_dir), "--output", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


# -- item 2: the run files never collide with what the Trainer writes ------------------------------

@pytest.mark.parametrize("mode", ["full", "lora"])
def test_save_model_into_output_dir_then_ftlab_replay_gives_the_trained_weights_bitwise(
        tmp_path, base, tiny_tokenizer, mode):
    model, _ = load_model(str(base))
    module = _lora(model) if mode == "lora" else model
    before = _trainable(module)
    trainer = _train(module, tmp_path / "out", tiny_tokenizer)
    trainer.save_model()  # into output_dir: the model's config.json (full) or adapter files (lora)
    trained = _trainable(module)
    assert any(not torch.equal(before[n], trained[n]) for n in before)  # it trained
    if mode == "full":
        assert "model_type" in json.loads((tmp_path / "out" / "config.json").read_text())
    # `ftlab replay OUTPUT_DIR` and `ftlab replay OUTPUT_DIR/ftlab` both rebuild it, bit for bit
    for i, run_dir in enumerate([tmp_path / "out", run_files_dir(tmp_path / "out")]):
        _replay_cli(run_dir, tmp_path / f"replayed{i}")
        if mode == "full":
            replayed = load_model(str(tmp_path / f"replayed{i}"))[0]  # also loads the tokenizer it saved
            got = {n: p for n, p in replayed.named_parameters()}
        else:
            loaded = load_trained(str(base), tmp_path / f"replayed{i}")[0]  # frozen: named like the trainables
            got = {n.removeprefix("base_model.model."): p for n, p in loaded.named_parameters() if "lora_" in n}
        assert got.keys() == trained.keys() and len(got) > 1
        for name, p in trained.items():
            assert torch.equal(got[name], p), name


def test_a_config_json_that_is_not_an_ftlab_run_config_is_one_clear_line(tmp_path, base, tiny_tokenizer):
    """What an earlier ZOTrainer's output_dir holds once save_model wrote over ftlab's config.json."""
    model, _ = load_model(str(base))
    _train(model, tmp_path / "out", tiny_tokenizer)
    old = tmp_path / "old"
    shutil.copytree(run_files_dir(tmp_path / "out"), old)
    shutil.copy(base / "config.json", old / "config.json")
    with pytest.raises(FtlabError) as e:
        replay_run(old)
    message = str(e.value)
    assert "is a transformers model config (model_type 'llama'), not the ftlab run config" in message
    assert "\n" not in message and "unknown key" not in message
    (old / "config.json").write_text(json.dumps({"foo": 1, "bar": [2]}))
    with pytest.raises(FtlabError, match=r"is another program's JSON \(keys bar, foo...\)"):
        replay_run(old)


def test_replay_of_a_base_model_folder_without_tokenizer(tmp_path, base, tiny_tokenizer):
    bare = tmp_path / "bare"  # the model's files only
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(bare)
    assert not any((bare / name).exists() for name in TOKENIZER_FILES)
    model = AutoModelForCausalLM.from_pretrained(bare)
    _train(model, tmp_path / "out", tiny_tokenizer)
    output = _replay_cli(tmp_path / "out", tmp_path / "replayed")
    assert "no tokenizer" in output
    assert not any((tmp_path / "replayed" / name).exists() for name in TOKENIZER_FILES)
    replayed = AutoModelForCausalLM.from_pretrained(tmp_path / "replayed")
    for (name, p), q in zip(replayed.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    # the library call: the module and no tokenizer; a folder with a tokenizer still gives it
    assert replay_run(tmp_path / "out")[1] is None
    assert load_model(str(bare), tokenizer="if_present")[1] is None
    assert load_model(str(base), tokenizer="if_present")[1] is not None
    with pytest.raises(FtlabError, match="cannot load model"):
        load_model(str(bare))  # required by default


# -- item 5: ergonomics ---------------------------------------------------------------------------

def test_prompt_collator_takes_the_rows_of_a_datasets_dataset(tmp_path, base, tiny_tokenizer):
    examples = tiny_run_data().splits.train
    # label words and indices (as text: one column type), read as ftlab's JSONL loader reads them
    rows = [{"text": e.fields["text"], "label": ["terrible", "great"][e.label] if i % 2 else str(e.label),
             "extra": i} for i, e in enumerate(examples)]
    collator = PromptCollator(tiny_tokenizer, SPEC)
    from_rows, from_examples = collator(rows[:4]), collator(examples[:4])
    assert torch.equal(from_rows["gold"], from_examples["gold"])
    assert torch.equal(from_rows["prompt_batch"].input_ids, from_examples["prompt_batch"].input_ids)
    named = PromptCollator(tiny_tokenizer, SPEC, label_field="sentiment", label_names=["neg", "pos"])
    assert named([{"text": "it was bad", "sentiment": "pos"}])["gold"].tolist() == [1]
    with pytest.raises(FtlabError, match=r"batch row 0: missing field 'text' \(fields present: 'sentence'"):
        collator([{"sentence": "no text field", "label": 0}])
    with pytest.raises(FtlabError, match=r"batch row 0: field 'label': label 'okay' is not recognised"):
        collator([{"text": "meh", "label": "okay"}])
    # through the Trainer, which would drop the columns the model's forward does not name
    model, _ = load_model(str(base))
    trainer = ZOTrainer(model=model, args=_args(tmp_path / "out"), train_dataset=Dataset.from_list(rows),
                        eval_dataset=Dataset.from_list(rows[:4]), data_collator=collator,
                        zo_args=ZOArguments(zo=ZOSettings(eps=1e-2)))
    trainer.train()
    assert len(list(TrajectoryLog(run_files_dir(tmp_path / "out")).steps())) == STEPS
    assert trainer.evaluate()["eval_loss"] > 0


@pytest.mark.parametrize("flag,message", [
    ("bf16", r"^TrainingArguments.bf16=True: mixed-precision autocast is for first-order training"),
    ("fp16", r"^TrainingArguments.fp16=True: mixed-precision autocast is for first-order training"),
    ("gradient_checkpointing", r"^TrainingArguments.gradient_checkpointing=True saves activations for a "
                               r"backward pass, and zo-sign runs none"),
])
def test_mixed_precision_and_gradient_checkpointing_are_refused_when_the_trainer_is_built(
        tmp_path, tiny_model, tiny_tokenizer, flag, message):
    if flag == "fp16":  # TrainingArguments itself refuses fp16 without a GPU: set it afterwards
        args = _args(tmp_path / "out")
        args.fp16 = True
    else:
        with warnings.catch_warnings():  # gradient_checkpointing: transformers 5's deprecated alias
            warnings.simplefilter("ignore")
            args = _args(tmp_path / "out", **{flag: True})
    with pytest.raises(FtlabError, match=message):
        ZOTrainer(tiny_model, args, zo_args=ZOArguments(optimizer="zo-sign"),
                  train_dataset=tiny_run_data().splits.train, data_collator=PromptCollator(tiny_tokenizer, SPEC))
    assert not (tmp_path / "out").exists()  # refused before the Trainer made output_dir


class _CountingCollator(PromptCollator):
    calls = 0

    def __call__(self, examples):
        type(self).calls += 1
        return super().__call__(examples)


class _Began(TrainerCallback):
    began = False

    def on_train_begin(self, args, state, control, **kwargs):
        type(self).began = True


def test_a_rerun_into_the_same_output_dir_is_refused_before_any_batch_and_overwrite_replaces_only_ftlab_files(
        tmp_path, base, tiny_tokenizer):
    out = tmp_path / "out"
    first = _train(load_model(str(base))[0], out, tiny_tokenizer)
    first.save_model()
    (out / "notes.txt").write_text("the user's own file")
    mine = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
            and run_files_dir(out) not in p.parents}
    log = (run_files_dir(out) / "trajectory.bin").read_bytes()
    # refused at train(): no batch collated, no callback run, nothing touched
    again = ZOTrainer(model=load_model(str(base))[0], args=_args(out), train_dataset=tiny_run_data().splits.train,
                      data_collator=_CountingCollator(tiny_tokenizer, SPEC), callbacks=[_Began()])
    with pytest.raises(FtlabError, match="holds the trajectory of an earlier run") as refused:
        again.train()
    assert _CountingCollator.calls == 0 and not _Began.began
    assert "resume_from_checkpoint" in str(refused.value) and "ZOArguments(overwrite=True)" in str(refused.value)
    assert (run_files_dir(out) / "trajectory.bin").read_bytes() == log
    # overwrite=True: a new run (another seed: another trajectory) replaces ftlab's run files only
    model = load_model(str(base))[0]
    _train(model, out, tiny_tokenizer, zo_args=ZOArguments(zo=ZOSettings(eps=1e-2), seed=7, overwrite=True))
    assert (run_files_dir(out) / "trajectory.bin").read_bytes() != log
    assert json.loads((run_files_dir(out) / "config.json").read_text())["zo_seed"] == 7
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
            and run_files_dir(out) not in p.parents} == mine
    replayed, _ = replay_run(out)
    for (name, p), q in zip(replayed.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_overwrite_does_not_stop_a_resume(tmp_path, base, tiny_tokenizer):
    """A resume continues the trajectory (cut back to the checkpoint), overwrite or not."""
    out = tmp_path / "out"

    def trainer(overwrite):
        return ZOTrainer(model=_lora(load_model(str(base))[0]), args=_args(out, save_strategy="steps", save_steps=2),
                         zo_args=ZOArguments(zo=ZOSettings(eps=1e-2), overwrite=overwrite),
                         train_dataset=tiny_run_data().splits.train, data_collator=PromptCollator(tiny_tokenizer, SPEC))

    straight = trainer(False)
    straight.train()
    steps = [(s, r.seeds, r.grads) for s, r in TrajectoryLog(run_files_dir(out)).steps()]
    resumed = trainer(True)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert [(s, r.seeds, r.grads) for s, r in TrajectoryLog(run_files_dir(out)).steps()] == steps
    for (name, p), q in zip(_trainable(straight.model).items(), _trainable(resumed.model).values()):
        assert torch.equal(p, q), name


def test_an_optimizer_that_needs_the_full_batch_is_refused(monkeypatch):
    class FullBatchZO:
        needs_full_batch = True

    monkeypatch.setitem(ZO_OPTIMIZERS, "full-batch-zo", ZOOptimizer(FullBatchZO))
    with pytest.raises(FtlabError, match=r"^ZOArguments.optimizer: full-batch-zo needs a full-batch objective.*"
                                         r"use `ftlab train`$"):
        ZOArguments(optimizer="full-batch-zo")
