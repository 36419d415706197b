"""Batch-size scaling: rules that carry hyperparameters to a new batch size (linear for SGD and
MeZO, square root for RMSprop/Adam), SVAG (an SDE simulator for SGD), and an experiment that
checks a rule by training at both batch sizes."""

from ftlab.scaling.rules import (OPTIMIZERS, OptimizerHParams, ScaledHParams, from_train_config, scale,
                                 to_train_config)
from ftlab.scaling.svag import SVAG, svag_coefficients

__all__ = ["OPTIMIZERS", "OptimizerHParams", "ScaledHParams", "from_train_config", "scale", "to_train_config",
           "SVAG", "svag_coefficients"]
