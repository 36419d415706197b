"""Targeted data selection (LESS, Xia et al. 2024): pick the training examples whose low-rank
gradient features align best with a few examples of the target task.

Numerical core: :mod:`~ftlab.select.projection` (seeded random projections, identical on every
device), :mod:`~ftlab.select.datastore` (sharded, memory-mapped, resumable feature stores) and
:mod:`~ftlab.select.scoring` (streaming LESS scores, top-k selection and its outputs).
"""

from ftlab.select.projection import ProjectionSpec, Projector, jl_tolerance
from ftlab.select.datastore import (Datastore, DatastoreManifest, DatastoreWriter, merge_datastores,
                                    write_distributed)
from ftlab.select.scoring import less_scores, make_id, select_top, split_id, write_selection
