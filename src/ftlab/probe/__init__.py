"""Linear probes on language-model features and the Quad objective (Saunshi, Malladi, Arora,
ICLR 2021, "A Mathematical Exploration of Why Language Models Help Solve Downstream Tasks").

* :mod:`ftlab.probe.features` -- ``f(s)``, ``Phi p_f(s)``, ``p_f(s)`` on a word subset, a middle
  layer, batched (one forward per batch, the vocabulary projection once);
* :mod:`ftlab.probe.store` / :mod:`ftlab.probe.cache` -- a resumable store per (model, task,
  split, kind);
* :mod:`ftlab.probe.probes` -- logistic-regression probes with C chosen on dev, Wilson intervals,
  the held-out R^2 of a linear map between features;
* :mod:`ftlab.probe.experiment` -- ``ftlab probe``: all of it for a task and ``k`` per class.

The Quad objective itself lives with the other objectives (``ftlab.objectives.quad``,
``objective=quad`` in training).
"""

from ftlab.probe.features import KINDS, FeatureSpec, batch_features, extract, middle_layer, single_token_ids
from ftlab.probe.probes import ProbeResult, fit_probe, linear_fit_r2, wilson_interval
from ftlab.probe.store import FeatureStore, model_fingerprint

__all__ = ["KINDS", "FeatureSpec", "batch_features", "extract", "middle_layer", "single_token_ids",
           "ProbeResult", "fit_probe", "linear_fit_r2", "wilson_interval", "FeatureStore", "model_fingerprint"]
