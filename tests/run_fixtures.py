"""A tiny classification run shared by the fault tests: eight cue-word sentences and a short
training config (tests import these helpers; the model comes from conftest's fixtures)."""

from ftlab.config import TrainConfig, load_config
from ftlab.tasks import Splits, TaskSpec
from ftlab.tasks.base import Example
from ftlab.train import RunData

SPEC = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])


def tiny_run_data() -> RunData:
    ex = [Example(id=f"s:{i}", fields={"text": f"the movie was {['bad', 'good'][i % 2]}"}, label=i % 2)
          for i in range(8)]
    return RunData(SPEC, Splits(train=ex, dev=ex[:4], test=ex[:4]))


def tiny_run_cfg(out, *overrides, steps=2, eval_every=0, checkpoint_every=1) -> TrainConfig:
    return load_config(TrainConfig, None, [f"output_dir={out}", f"steps={steps}", "batch_size=2",
                                           f"eval_every={eval_every}", f"checkpoint_every={checkpoint_every}",
                                           "lr=1e-3", "eval_batch_size=4", *overrides])
