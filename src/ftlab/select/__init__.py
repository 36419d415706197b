"""Targeted data selection (LESS, Xia et al. 2024): pick the training examples whose low-rank
gradient features align best with a few examples of the target task.

Numerical core: :mod:`~ftlab.grads.projection` (seeded random projections, identical on every
device), :mod:`~ftlab.select.datastore` (sharded, memory-mapped, resumable feature stores) and
:mod:`~ftlab.select.scoring` (streaming LESS scores, top-k selection and its outputs).
"""

from ftlab.grads.projection import ProjectionSpec, Projector, jl_tolerance
from ftlab.select.baselines import random_scores, representation_scores, representation_store

# Model side: instruction data, LoRA warm-up, gradient features, baselines, the end-to-end recipe.
from ftlab.select.data import InstructionExample, load_instructions
from ftlab.select.datastore import Datastore, DatastoreManifest, DatastoreWriter, merge_datastores, write_distributed
from ftlab.select.features import adam_precondition, collect_features, per_example_grads
from ftlab.select.pipeline import SelectConfig, run_pipeline
from ftlab.select.pool import PoolSpec, build_evals_pool
from ftlab.select.scoring import less_scores, make_id, select_top, split_id, write_selection
from ftlab.select.warmup import WarmupCheckpoint, WarmupSettings, run_warmup
