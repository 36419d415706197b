"""Zeroth-order fine-tuning inside Hugging Face's ``Trainer``: :class:`ZOTrainer`.

``ZOTrainer`` is a ``transformers.Trainer`` whose optimizer is one of ftlab's zeroth-order
optimizers (``ftlab.zo.ZO_OPTIMIZERS``: MeZO and its variants). Everything else is the
Trainer's: ``TrainingArguments`` (lr, its schedule and warm-up, weight decay, batch size,
gradient accumulation, max_steps, seed, logging, evaluation, saving), datasets and collators,
callbacks, ``evaluate`` and ``save_model``; peft models train their adapters only. The zeroth-order
knobs come in a small serialisable :class:`ZOArguments` (``ftlab.zo.ZOSettings`` plus the
optimizer's name and seed).

A step follows the MeZO rules: the forwards run in eval mode (no dropout noise in the loss
difference) and under ``torch.no_grad`` (no activations kept for a backward, no gradients),
and MeZO keeps no optimizer state. With gradient accumulation, each perturbation is evaluated
on every micro-batch of the step and the micro-batch losses are averaged (as ``ftlab train``).

The run is written as ``ftlab train`` writes a MeZO run, into the subfolder ``ftlab/`` of
``output_dir`` (main process only), out of the way of the ``config.json``, weights and
``checkpoint-N/`` folders that the Trainer, ``save_model`` and its checkpoints write into
``output_dir``. ``ftlab replay OUTPUT_DIR --output DIR`` (or ``ftlab replay OUTPUT_DIR/ftlab``)
rebuilds the weights without a forward:

    ftlab/trajectory.bin     the checksummed trajectory log (:mod:`ftlab.zo.trajectory`), one record per step
    ftlab/config.json        the run as an ftlab ``TrainConfig`` (base model, dtype, mode, LoRA settings,
                             optimizer, ZO settings, seeds): what ``ftlab replay`` rebuilds the module from
    ftlab/init.safetensors   the trainable tensors before the first step (LoRA adapters: their random
                             init is the user's, not ftlab's); absent for full fine-tuning (the base model is the init)
    ftlab/zo_trainer.json    the ZOArguments and the TrainingArguments of the run, for the record

A new run into an ``output_dir`` whose ``ftlab/`` holds a trajectory is refused when ``train()``
starts (before any batch is drawn), unless it resumes (``train(resume_from_checkpoint=...)``,
which continues that trajectory) or ``ZOArguments(overwrite=True)``, which deletes these four
files (and nothing else: the Trainer's checkpoints and saved models stay) before the new run.
Mixed precision (``bf16``/``fp16``) and ``gradient_checkpointing`` are refused when the
trainer is built: a zeroth-order step runs no backward, and its precision is the model's dtype
(load the model in bfloat16 for exact MeZO in bf16).

Replay needs the base model to be loadable by :func:`ftlab.models.load_model` (an embedded
name, a local folder or a hub name: ``ZOArguments.base_model``, else the model's
``name_or_path``) and, for peft models, a LoRA adapter ftlab can rebuild (``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``; no DoRA, rsLoRA, biases or ``modules_to_save``). A run that
cannot be replayed still trains and logs its trajectory; ``config.json`` is then not written and
a warning says why.

Prompt-based classification with ftlab's objective (the option cross-entropy, as ``ftlab
train``): give a ``datasets.Dataset`` (or a list of dicts) whose rows hold the template's fields
and a label, or lists of :class:`ftlab.tasks.base.Example`, as datasets and a
:class:`PromptCollator`; evaluation then returns option scores as predictions and the gold
options as labels (``compute_metrics=prompt_accuracy``). The Trainer keeps every column of such
a dataset (``remove_unused_columns`` does not apply: the collator reads the fields). Any other
dataset and collator use the model's own loss, as the plain Trainer does.

Example (own data, the embedded model, no hub)::

    from datasets import Dataset
    from transformers import TrainingArguments
    from ftlab.integrations.hf import PromptCollator, ZOArguments, ZOTrainer
    from ftlab.models import load_model
    from ftlab.tasks import TaskSpec

    model, tokenizer = load_model("smollm2-135m")  # the embedded model: no hub
    spec = TaskSpec(name="reviews", template="{text} It was", options=[" terrible", " great"])
    data = Dataset.from_list([{"text": "A wonderful, moving film.", "label": "great"},
                              {"text": "Dull, and far too long.", "label": "terrible"}] * 8)
    args = TrainingArguments(output_dir="runs/hf-mezo", max_steps=10, per_device_train_batch_size=4,
                             learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=5, report_to=[])
    trainer = ZOTrainer(model=model, args=args, zo_args=ZOArguments(), train_dataset=data,
                        data_collator=PromptCollator(tokenizer, spec))
    trainer.train()
    trainer.save_model()  # the model into runs/hf-mezo; ftlab's run files are in runs/hf-mezo/ftlab/
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ftlab.checkpoint import run_id, save_trainable
from ftlab.config import ConfigError, DataConfig, TrainConfig, check, to_dict
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json
from ftlab.models import LoraSettings
from ftlab.objectives import Encoder, option_scores, training_batch
from ftlab.objectives import loss as prompt_loss
from ftlab.optim import param_groups
from ftlab.rundir import RunDir
from ftlab.tasks import TaskSpec
from ftlab.tasks.base import Example
from ftlab.tasks.files import to_examples
from ftlab.train import ZOTRAINER_SUBDIR, make_closure
from ftlab.zo import ZO_OPTIMIZERS, ZOSettings, build_zo_optimizer
from ftlab.zo.trajectory import LOG, TrajectoryLog

INIT = "init.safetensors"
RECORD = "zo_trainer.json"
CONFIG = "config.json"
RUN_FILES = (LOG, CONFIG, INIT, RECORD)  # ftlab's own files in run_files_dir(output_dir): all it ever replaces
_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
              "cosine": "cosine"}


@dataclass
class ZOArguments:
    """The zeroth-order part of a :class:`ZOTrainer`'s config (the rest is ``TrainingArguments``).

    Attributes:
        optimizer: a key of ``ftlab.zo.ZO_OPTIMIZERS`` (mezo, zo-momentum, zo-adam, zo-sign, sparse-mezo,
            fzoo, hizoo, lozo, lozo-m, zo-guided, lowrank-fzoo; mezo-svrg is refused: it needs
            a full-batch objective, which only ``ftlab train`` builds).
        zo: eps, n_perturbations, distribution, generator... (see :class:`ftlab.zo.ZOSettings`).
        seed: seeds the perturbations (None: ``TrainingArguments.seed``).
        base_model: what ``ftlab replay`` loads the base model from (None: the model's ``name_or_path``).
        max_skipped_steps: steps with a NaN/inf loss are skipped (theta restored, logged with lr
            0); training stops with an error after this many.
        overwrite: a new run into an ``output_dir`` that holds an earlier run's trajectory replaces
            ftlab's run files there (``output_dir/ftlab/``; nothing else) instead of being refused.
    """

    optimizer: str = "mezo"
    zo: ZOSettings = field(default_factory=ZOSettings)
    seed: int | None = None
    base_model: str | None = None
    max_skipped_steps: int = 10
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ZO_OPTIMIZERS:
            raise FtlabError(f"ZOArguments.optimizer: unknown zeroth-order optimizer {self.optimizer!r}; "
                             f"choose one of {', '.join(ZO_OPTIMIZERS)}")
        if getattr(ZO_OPTIMIZERS[self.optimizer].cls, "needs_full_batch", False):
            raise FtlabError(f"ZOArguments.optimizer: {self.optimizer} needs a full-batch objective, which the "
                             f"Trainer's mini-batches do not give; use `ftlab train`")
        if self.max_skipped_steps < 0:
            raise FtlabError(f"ZOArguments.max_skipped_steps: must be >= 0 (got {self.max_skipped_steps})")
        check(self.zo, "ZOArguments.zo")


class PromptCollator:
    """Collates prompt examples into prompt batches for ``spec`` (left-padded, every option
    scored: see :class:`ftlab.objectives.Encoder`); the trainer computes ftlab's option
    cross-entropy on them instead of the model's language-modelling loss.

    An example is an ftlab :class:`Example` or a dict row (a ``datasets.Dataset``'s): the
    template's fields and, for classification, the label in ``label_field`` (an option index,
    an option word such as ``"great"`` for ``" great"``, or one of ``label_names``), for
    generation the answers in ``answers_field``; read as ``ftlab.tasks`` reads a JSONL row."""

    def __init__(self, tokenizer: Any, spec: TaskSpec, max_length: int = 256, *, label_field: str = "label",
                 answers_field: str = "answers", label_names: list[str] | None = None) -> None:
        self.encoder = Encoder(tokenizer, spec, max_length=max_length)
        self.spec = spec
        self._row_fields = {"label_field": label_field, "answers_field": answers_field, "label_names": label_names}

    def __call__(self, examples: Sequence[Example | Mapping[str, Any]]) -> dict[str, Any]:
        batch = training_batch(self.encoder, [self._example(e, i) for i, e in enumerate(examples)])
        # "gold" first: the Trainer reads the batch size from the first tensor it finds.
        return {"gold": batch.gold, "prompt_batch": batch, "option_ids": self.encoder.option_ids}

    def _example(self, row: Example | Mapping[str, Any], i: int) -> Example:
        if isinstance(row, Example):
            return row
        if not isinstance(row, Mapping):
            raise FtlabError(f"PromptCollator: batch item {i} is a {type(row).__name__}; give ftlab Examples or dict "
                             f"rows (e.g. a datasets.Dataset's) with the fields {sorted(self.spec.placeholders())}")
        return to_examples([(f"PromptCollator: batch row {i}", row)], self.spec, id_prefix="row",
                           **self._row_fields)[0]


def prompt_accuracy(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for prompt batches: the accuracy of the best-scored option."""
    scores, gold = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((scores.argmax(-1) == gold).mean())}


def _step_with_closure_only(self: torch.optim.Optimizer, closure: Any = None) -> Any:
    """The zeroth-order optimizer's ``step`` as the Trainer sees it: the step is taken in
    :meth:`ZOTrainerMixin.training_step` (with the closure of the step's forwards); the
    Trainer's own ``optimizer.step()`` after the backward it no longer runs is a no-op."""
    return None if closure is None else type(self).step(self, closure)


class ZOTrainerMixin:
    """Turns a ``transformers.Trainer`` (or a subclass of it, e.g. TRL's ``SFTTrainer``) into a
    zeroth-order trainer: ``class MyTrainer(ZOTrainerMixin, SomeTrainer)``. See the module docstring."""

    def __init__(self, *args: Any, zo_args: ZOArguments | None = None, **kwargs: Any) -> None:
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise FtlabError("ZOTrainer builds its own zeroth-order optimizer (ZOArguments.optimizer); "
                             "pass no optimizer in optimizers=(...)")
        self.zo_args = zo_args or ZOArguments()
        # Checked before the Trainer's __init__, which creates output_dir: (model, args, ...) or args=.
        _check_training_args(kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None),
                             self.zo_args.optimizer)
        self.zo_optimizer: torch.optim.Optimizer | None = None
        self._zo_log: TrajectoryLog | None = None
        self._zo_micro: list[dict[str, Any]] = []
        self._zo_skipped = 0
        super().__init__(*args, **kwargs)

    # -- the optimizer ---------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The zeroth-order optimizer over the trainable parameters, grouped as ``ftlab train``
        groups them (no weight decay on biases and norms; the order defines z, so a replay
        rebuilds the same groups)."""
        if self.optimizer is None:
            module = self.model if model is None else model
            seed = self.args.seed if self.zo_args.seed is None else self.zo_args.seed
            optimizer = build_zo_optimizer(self.zo_args.optimizer, param_groups(module, self.args.weight_decay),
                                           self.args.learning_rate, self.zo_args.zo, seed)
            optimizer.attach(module)  # exact mode (bf16/fp16) perturbs inside the module's forwards
            optimizer.step = types.MethodType(_step_with_closure_only, optimizer)
            self.zo_optimizer = self.optimizer = optimizer
        return self.optimizer

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        return None  # there are no gradients

    def _clip_grad_norm(self, model: nn.Module) -> None:
        return None

    # -- the data --------------------------------------------------------------------------------
    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        """A PromptCollator reads the template's fields, which the model's forward does not name:
        the dataset keeps its columns."""
        if isinstance(self.data_collator, PromptCollator):
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        if isinstance(data_collator, PromptCollator):
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description)

    # -- the run -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``, after checking (main process) that a new run does not write
        over an earlier run's trajectory (see the module docstring)."""
        if self.is_world_process_zero():
            self._zo_claim_run_files(resuming=resume_from_checkpoint not in (None, False))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _zo_claim_run_files(self, resuming: bool) -> None:
        """A fresh run into an output_dir whose ``ftlab/`` holds a trajectory: refused, or with
        ``ZOArguments.overwrite`` its run files deleted. A resume continues the trajectory."""
        folder = run_files_dir(self.args.output_dir)
        if resuming or not (folder / LOG).exists():
            return
        if not self.zo_args.overwrite:
            raise FtlabError(f"{folder / LOG} holds the trajectory of an earlier run; pass another output_dir, "
                             f"resume it with train(resume_from_checkpoint=...), or set ZOArguments(overwrite=True) "
                             f"to replace ftlab's run files there (only those)")
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Collect the micro-batches of one step; at its last, take the zeroth-order step on
        all of them (forwards only, eval mode) and append it to the trajectory log. Returns the
        step's loss at the last micro-batch (0 before it), so the Trainer's running sum is the
        mean loss per step."""
        model.eval()  # MeZO: no dropout noise in the loss difference
        self._zo_micro.append(self._prepare_inputs(inputs))
        device = self.args.device
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=device)
        if self._zo_log is None:
            self._zo_begin(model)
        parts = [functools.partial(self._zo_loss, model, micro) for micro in self._zo_micro]
        self._zo_micro = []
        optimizer = self.zo_optimizer
        loss = optimizer.step(make_closure(optimizer, parts, None))  # a closure under torch.no_grad
        record = optimizer.history.pop()
        if self.is_world_process_zero():
            self._zo_log.append(self.state.global_step, record)
        if not torch.isfinite(loss):
            self._zo_skipped += 1
            if self._zo_skipped > self.zo_args.max_skipped_steps:
                raise FtlabError(f"the loss was non-finite in {self._zo_skipped} steps (last at step "
                                 f"{self.state.global_step}): lower the learning rate or use float32")
        return loss.detach().to(device)

    def _zo_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """ftlab's option cross-entropy for prompt batches (:class:`PromptCollator`), else the
        Trainer's own loss."""
        if "prompt_batch" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        batch = inputs["prompt_batch"].to(self.args.device)
        value = prompt_loss(model, batch, inputs["option_ids"])
        return (value, None) if return_outputs else value

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """For prompt batches: (option cross-entropy, option scores, gold options)."""
        if "prompt_batch" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        batch = inputs["prompt_batch"].to(self.args.device)
        with torch.no_grad():
            scores = option_scores(model, batch, inputs["option_ids"])
            value = F.cross_entropy(scores, batch.gold)
        return (value, None, None) if prediction_loss_only else (value, scores, batch.gold)

    # -- the run folder --------------------------------------------------------------------------
    def _zo_begin(self, model: nn.Module) -> None:
        """Open the trajectory log at the first step (after a resume: cut back to the resumed
        step) and, on a fresh run, write what ``ftlab replay`` needs."""
        out = run_files_dir(self.args.output_dir)
        step = self.state.global_step
        log = TrajectoryLog(out, z=self.zo_optimizer.z_spec())
        if self.is_world_process_zero():
            if step == 0 and log.path.exists():  # train() checked it; this run was started by other means
                raise FtlabError(f"{log.path} holds the trajectory of an earlier run; pass another output_dir "
                                 f"(or set ZOArguments(overwrite=True)): a new run never writes over it unasked")
            if step > 0:
                done = sum(1 for _ in log.steps(allow_torn_tail=True))
                if done < step:
                    raise FtlabError(f"{log.path} holds {done} steps but the checkpoint resumed is at step {step}: "
                                     "the trajectory log was cut or replaced")
                log.truncate(step)
            else:
                self._zo_write_replay_files(model, out, log)
        self._zo_log = log

    def _zo_write_replay_files(self, model: nn.Module, out: Path, log: TrajectoryLog) -> None:
        module = self.accelerator.unwrap_model(model)
        cfg, reason = replay_config(module, self.args, self.zo_args, steps=self.state.max_steps)
        out.mkdir(parents=True, exist_ok=True)
        for stale in (CONFIG, INIT):  # left by a start that never took a step: not this run's
            (out / stale).unlink(missing_ok=True)
        atomic_write_json(out / RECORD, {"zo_args": to_dict(self.zo_args),
                                         "training_args": json.loads(self.args.to_json_string()),
                                         "replayable": cfg is not None, "reason": reason})
        if cfg is None:
            warnings.warn(f"ZOTrainer: `ftlab replay` cannot rebuild this run ({reason}); its trajectory is "
                          f"logged in {out / LOG} all the same", stacklevel=3)
            return
        cfg = dataclasses.replace(cfg, output_dir=str(out))
        log.run_id = run_id(cfg)
        if cfg.mode != "full":
            save_trainable(module, out / INIT)
        atomic_write_json(RunDir(out).config, to_dict(cfg))


def run_files_dir(output_dir: str | Path) -> Path:
    """Where a ZOTrainer keeps its run files (trajectory, ftlab config...): ``output_dir/ftlab``."""
    return Path(output_dir) / ZOTRAINER_SUBDIR


def _check_training_args(args: Any, optimizer: str) -> None:
    """Refuse the TrainingArguments a zeroth-order step cannot honour, with ``ftlab train``'s reasons."""
    if args is None:
        return
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        flag = "bf16" if getattr(args, "bf16", False) else "fp16"
        raise FtlabError(f"TrainingArguments.{flag}=True: mixed-precision autocast is for first-order training; "
                         f"for {optimizer} load the model in that dtype instead (e.g. load_model(..., "
                         f"dtype='bfloat16'): exact MeZO in bf16) and leave {flag}=False")
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        raise FtlabError(f"TrainingArguments.gradient_checkpointing=True saves activations for a backward pass, "
                         f"and {optimizer} runs none; set gradient_checkpointing=False")


class ZOTrainer(ZOTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains with an ftlab zeroth-order optimizer (MeZO by
    default): ``ZOTrainer(model, args=TrainingArguments(...), zo_args=ZOArguments(...), ...)``."""


def replay_config(module: nn.Module, args: Any, zo_args: ZOArguments, steps: int | None = None
                  ) -> tuple[TrainConfig | None, str]:
    """The ``TrainConfig`` from which ``ftlab replay`` rebuilds a ZOTrainer run of ``module``
    (the lr of every step comes from the log; ``steps``: the run's total, default
    ``args.max_steps``), or ``(None, why not)``."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(module, PeftModel):
        mode = "lora"
        lora, why = _lora_settings(module)
        if lora is None:
            return None, why
        base = module.get_base_model()
    elif isinstance(module, PreTrainedModel):
        mode, lora, base = "full", LoraSettings(), module
    else:
        return None, f"a {type(module).__name__} is neither a transformers model nor a peft model"
    name = zo_args.base_model or getattr(base, "name_or_path", "") or ""
    if not name:
        return None, "the base model has no name_or_path; set ZOArguments.base_model"
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        return None, f"its weights are {dtype}"
    ga = args.gradient_accumulation_steps
    seed = args.seed if zo_args.seed is None else zo_args.seed
    steps = max(steps or args.max_steps, 1)
    try:  # checked when built, each fault named as a field of the run
        cfg = TrainConfig(
            model=name, dtype=dtype, device="cuda" if args.device.type == "cuda" else "cpu",
            data=DataConfig(), mode=mode, lora=lora, optimizer=zo_args.optimizer, zo=zo_args.zo,
            lr=args.learning_rate, weight_decay=args.weight_decay, max_grad_norm=None,
            max_skipped_steps=zo_args.max_skipped_steps,
            schedule=_SCHEDULES.get(str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)), "constant"),
            warmup_steps=int(args.get_warmup_steps(steps)), steps=steps,
            batch_size=args.per_device_train_batch_size * ga * max(args.world_size, 1), grad_accum=ga,
            eval_every=0, checkpoint_every=0, seed=args.seed, init_seed=args.seed, zo_seed=seed)
    except ConfigError as e:
        return None, str(e.at("ZOTrainer run"))
    return cfg, ""


def _lora_settings(module: nn.Module) -> tuple[LoraSettings | None, str]:
    """The ftlab LoRA settings that rebuild ``module``'s adapter, or ``(None, why not)``."""
    configs = module.peft_config
    if len(configs) != 1 or "default" not in configs:
        return None, f"the peft model has adapters {sorted(configs)} (ftlab rebuilds one named 'default')"
    c = configs["default"]
    if type(c).__name__ != "LoraConfig":
        return None, f"the adapter is {type(c).__name__} (ftlab rebuilds LoRA)"
    unsupported = [k for k, bad in (("use_dora", getattr(c, "use_dora", False)),
                                    ("use_rslora", getattr(c, "use_rslora", False)),
                                    ("bias", getattr(c, "bias", "none") != "none"),
                                    ("modules_to_save", bool(getattr(c, "modules_to_save", None))),
                                    ("rank_pattern", bool(getattr(c, "rank_pattern", None))),
                                    ("alpha_pattern", bool(getattr(c, "alpha_pattern", None))),
                                    ("layers_to_transform", getattr(c, "layers_to_transform", None) is not None))
                   if bad]
    if unsupported:
        return None, f"its LoRA config sets {unsupported}"
    targets = c.target_modules
    if isinstance(targets, str):
        return None, f"its LoRA target_modules is a regular expression ({targets!r})"
    alpha = c.lora_alpha
    if alpha != int(alpha):
        return None, f"its lora_alpha {alpha} is not an integer"
    try:
        return LoraSettings(r=c.r, alpha=int(alpha), dropout=c.lora_dropout, target_modules=sorted(targets)), ""
    except ConfigError as e:
        return None, str(e.at("ZOTrainer run.lora"))
