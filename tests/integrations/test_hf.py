"""ZOTrainer: a transformers Trainer driving ftlab's MeZO gives the trajectory `ftlab train` gives,
and its output_dir replays; callbacks, evaluation and save_model work; MeZO's rules hold."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import Sampler
from transformers import TrainerCallback, TrainingArguments

from ftlab.errors import FtlabError
from ftlab.integrations.hf import INIT, PromptCollator, ZOArguments, ZOTrainer, prompt_accuracy, run_files_dir
from ftlab.models import load_model
from ftlab.train import batch_indices, replay_run, train
from ftlab.zo import ZOSettings
from ftlab.zo.trajectory import TrajectoryLog

from run_fixtures import tiny_run_cfg, tiny_run_data

STEPS, BATCH, SEED, LR = 6, 2, 3, 5e-3
ZO = ["optimizer=mezo", "zo.eps=1e-2", "zo.n_perturbations=2", "weight_decay=0.01", f"lr={LR}", f"seed={SEED}"]


class FtlabOrder(ZOTrainer):
    """Feeds the Trainer's dataloader ftlab's batch order (``batch_indices``), so both loops see
    the same batches; everything else is the plain ZOTrainer."""

    def _get_train_sampler(self, train_dataset=None):
        n = len(self.train_dataset)
        order = [i for s in range(STEPS) for i in batch_indices(n, BATCH, SEED, s)]

        class Fixed(Sampler):
            def __iter__(self):
                return iter(order)

            def __len__(self):
                return len(order)
        return Fixed()


class Recorder(TrainerCallback):
    """Records the steps the Trainer reports, and the evaluations."""

    def __init__(self):
        self.steps, self.evals = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals.append(metrics)


def _args(out, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=4, learning_rate=LR, weight_decay=0.01,
                             lr_scheduler_type="constant", seed=SEED, report_to=[], logging_steps=1,
                             use_cpu=True, dataloader_num_workers=0, **kw)


def _lora(model):
    with torch.random.fork_rng(devices=[]):  # as `ftlab train` seeds the adapter init
        torch.manual_seed(SEED)
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _trainable(module):
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_zotrainer_and_ftlab_train_give_the_same_trajectory_and_it_replays(tmp_path, base, mode):
    data = tiny_run_data()
    # ftlab train
    model, tokenizer = load_model(str(base))
    cfg = tiny_run_cfg(tmp_path / "ftlab", f"model={base}", f"mode={mode}", f"steps={STEPS}", *ZO)
    train(cfg, progress=False, model_and_tokenizer=(model, tokenizer), data=data)
    # (lora: peft injected the adapters into the base model in place)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if mode == "full" or "lora_" in n}
    # the same run with the Hugging Face Trainer
    hf_model, _ = load_model(str(base))
    module = _lora(hf_model) if mode == "lora" else hf_model
    initial = _trainable(module)
    recorder = Recorder()
    trainer = FtlabOrder(model=module, args=_args(tmp_path / "hf", eval_strategy="steps", eval_steps=3),
                         zo_args=ZOArguments(zo=ZOSettings(eps=1e-2, n_perturbations=2)),
                         train_dataset=data.splits.train, eval_dataset=data.splits.dev,
                         data_collator=PromptCollator(tokenizer, data.spec), compute_metrics=prompt_accuracy,
                         callbacks=[recorder])
    trainer.train()

    ours, theirs = (list(TrajectoryLog(d).steps()) for d in (run_files_dir(tmp_path / "hf"), tmp_path / "ftlab"))
    assert len(ours) == STEPS and len(ours[0][1].seeds) == 2
    for (s1, a), (s2, b) in zip(ours, theirs):  # same seeds, projected gradients (float32) and lr per step
        assert (s1, a.seeds, a.grads, a.lr) == (s2, b.seeds, b.grads, b.lr)
    got = _trainable(module) if mode == "lora" else {n: p.detach() for n, p in module.named_parameters()}
    assert got.keys() == {n.removeprefix("base_model.model.") for n in want} and len(got) > 1
    for name, tensor in want.items():
        assert torch.equal(got[name.removeprefix("base_model.model.")], tensor), name
    assert any(not torch.equal(got[n], t) for n, t in initial.items())  # it trained
    # `ftlab replay` of the Trainer's output_dir rebuilds the same weights, bit for bit
    assert (run_files_dir(tmp_path / "hf") / INIT).exists() == (mode == "lora")
    replayed, _ = replay_run(tmp_path / "hf")
    for name, p in _trainable(replayed).items():
        assert torch.equal(p, got[name]), name
    # the Trainer's own machinery ran: callbacks every step, evaluation with the metrics
    assert recorder.steps == list(range(1, STEPS + 1))
    assert [e["epoch"] > 0 for e in recorder.evals] == [True, True]
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and "eval_loss" in e for e in recorder.evals)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == STEPS and all(loss > 0 for loss in losses)


def test_mezo_rules_eval_mode_no_grad_no_state_and_save_model(tmp_path, base, tiny_tokenizer):
    data = tiny_run_data()
    model, _ = load_model(str(base))
    module = _lora(model)
    module.train()  # the Trainer must switch it to eval mode itself
    seen = []
    hook = module.get_base_model().model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    trainer = ZOTrainer(model=module, args=_args(tmp_path / "run", gradient_accumulation_steps=2),
                        train_dataset=data.splits.train, data_collator=PromptCollator(tiny_tokenizer, data.spec))
    trainer.train()
    hook.remove()
    # 2 forwards per step x 2 micro-batches, all in eval mode and without autograd
    assert len(seen) == STEPS * 4 and set(seen) == {(False, False)}
    assert all(p.grad is None for p in module.parameters())
    assert not trainer.zo_optimizer.state  # MeZO keeps no optimizer state
    cfg = json.loads((run_files_dir(tmp_path / "run") / "config.json").read_text())
    assert (cfg["mode"], cfg["grad_accum"], cfg["batch_size"], cfg["lora"]["r"]) == ("lora", 2, 4, 8)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(load_model(str(base))[0], str(tmp_path / "saved"))
    for (name, p), q in zip(_trainable(module).items(), _trainable(reloaded).values()):
        assert torch.equal(p, q), name
    # a second run into the same output_dir is refused, the log left as it was
    before = (run_files_dir(tmp_path / "run") / "trajectory.bin").read_bytes()
    again = ZOTrainer(model=_lora(load_model(str(base))[0]), args=_args(tmp_path / "run"),
                      train_dataset=data.splits.train, data_collator=PromptCollator(tiny_tokenizer, data.spec))
    with pytest.raises(FtlabError, match="holds the trajectory of an earlier run"):
        again.train()
    assert (run_files_dir(tmp_path / "run") / "trajectory.bin").read_bytes() == before


def test_a_language_modelling_dataset_uses_the_model_loss(tmp_path, base, tiny_tokenizer):
    """Without a PromptCollator: the plain HF way (input_ids + labels, the model's own loss)."""
    model, _ = load_model(str(base))
    texts = ["the movie was good", "the film was bad and the plot was terrible"] * 4
    rows = [tiny_tokenizer(t) for t in texts]
    dataset = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    from transformers import DataCollatorForSeq2Seq

    trainer = ZOTrainer(model=model, args=_args(tmp_path / "lm", max_grad_norm=1.0),
                        zo_args=ZOArguments(optimizer="zo-sign", zo=ZOSettings(eps=1e-3)), train_dataset=dataset,
                        data_collator=DataCollatorForSeq2Seq(tiny_tokenizer, padding=True))
    trainer.train()
    assert len(list(TrajectoryLog(run_files_dir(tmp_path / "lm")).steps())) == STEPS
    replayed, _ = replay_run(tmp_path / "lm")
    for (name, p), q in zip(replayed.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_bad_zo_arguments_are_one_line_errors():
    with pytest.raises(FtlabError, match="unknown zeroth-order optimizer 'adam'"):
        ZOArguments(optimizer="adam")
    with pytest.raises(FtlabError, match=r"^zo.eps: must be > 0"):
        ZOSettings(eps=0.0)  # refused when built
    zo = ZOSettings()
    zo.eps = 0.0  # or changed afterwards: ZOArguments names it as its field
    with pytest.raises(FtlabError, match=r"ZOArguments.zo.eps: must be > 0"):
        ZOArguments(zo=zo)


def test_trl_sft_trainer_takes_the_mixin(tmp_path, base, tiny_tokenizer):
    """TRL's SFTTrainer becomes a zeroth-order trainer the same way (TRL is not a dependency:
    skipped unless installed, e.g. in benchmarks/.venv)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from ftlab.integrations.hf import ZOTrainerMixin

    class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer):
        pass

    model, _ = load_model(str(base))
    module = _lora(model)
    texts = ["the movie was good", "the film was bad and the plot was terrible", "It was great"] * 4
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=2,
                         learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                         logging_steps=1, use_cpu=True, max_length=32, bf16=False)  # TRL defaults to bf16
    trainer = ZOSFTTrainer(model=module, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                           processing_class=tiny_tokenizer, zo_args=ZOArguments(zo=ZOSettings(eps=1e-2)))
    trainer.train()
    assert len(list(TrajectoryLog(run_files_dir(tmp_path / "sft")).steps())) == 4 and not trainer.zo_optimizer.state
    assert all(p.grad is None for p in module.parameters())
    replayed, _ = replay_run(tmp_path / "sft")
    trained = _trainable(module)
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in trained.items() if "lora_B" in n)
    for name, p in _trainable(replayed).items():
        assert torch.equal(p, trained[name]), name


class _Killed(Exception):
    pass


def test_resume_from_checkpoint_cuts_the_log_back_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, base, tiny_tokenizer):
    data = tiny_run_data()

    def trainer(out, callbacks=()):
        return FtlabOrder(model=_lora(load_model(str(base))[0]),
                          args=_args(out, save_strategy="steps", save_steps=3),
                          zo_args=ZOArguments(zo=ZOSettings(eps=1e-2)), train_dataset=data.splits.train,
                          data_collator=PromptCollator(tiny_tokenizer, data.spec), callbacks=list(callbacks))

    straight = trainer(tmp_path / "a")
    straight.train()

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after the step-3 checkpoint; steps 4 and 5 are logged
                raise _Killed

    with pytest.raises(_Killed):
        trainer(tmp_path / "b", [Kill()]).train()
    assert len(list(TrajectoryLog(run_files_dir(tmp_path / "b")).steps())) == 5
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert [(s, r.seeds, r.grads) for s, r in TrajectoryLog(run_files_dir(tmp_path / "b")).steps()] == \
        [(s, r.seeds, r.grads) for s, r in TrajectoryLog(run_files_dir(tmp_path / "a")).steps()]
    for (name, p), q in zip(_trainable(straight.model).items(), _trainable(resumed.model).values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("optimizer,settings", [
    ("fzoo", {"distribution": "rademacher", "n_perturbations": 4}), ("hizoo", {}), ("lozo-m", {"rank": 2}),
    ("zo-guided", {"pool_size": 4}), ("lowrank-fzoo", {"n_perturbations": 4, "rank": 2}),
])
def test_the_new_estimators_train_under_zotrainer(tmp_path, base, tiny_tokenizer, optimizer, settings):
    data = tiny_run_data()
    module = _lora(load_model(str(base))[0])
    before = _trainable(module)
    trainer = ZOTrainer(model=module, args=_args(tmp_path / "run"), train_dataset=data.splits.train,
                        data_collator=PromptCollator(tiny_tokenizer, data.spec),
                        zo_args=ZOArguments(optimizer=optimizer, zo=ZOSettings(eps=1e-2, **settings)))
    trainer.train()
    after = _trainable(module)
    assert type(trainer.zo_optimizer).__name__ != "MeZO"
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters moved
    assert all(torch.isfinite(p).all() for p in after.values())
    assert len(trainer.zo_optimizer.history) == 0  # every step's record went to the log
