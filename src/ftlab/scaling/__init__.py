"""Batch-size scaling: rules that carry hyperparameters to a new batch size (linear for SGD and
MeZO, square root for RMSprop/Adam), SVAG (an SDE simulator for SGD), and an experiment that
checks a rule by training at both batch sizes; two more recipes compare optimizers the same way:
``momentum`` (SGD with momentum vs SGD at eta / (1 - beta)) and ``local_sgd`` (Local SGD, constant
H and the quadratic synchronization rule, vs synchronous data parallelism)."""

from ftlab.scaling.rules import OPTIMIZERS, OptimizerHParams, ScaledHParams, from_train_config, scale, to_train_config
from ftlab.scaling.svag import SVAG, svag_coefficients

__all__ = ["OPTIMIZERS", "OptimizerHParams", "ScaledHParams", "from_train_config", "scale", "to_train_config",
           "SVAG", "svag_coefficients"]
