"""A datastore written by 2 ``torchrun`` processes (gloo) equals the single-process one, also
when one rank resumes the part a crash left behind."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from ftlab.select import Datastore, DatastoreWriter, ProjectionSpec, Projector, write_distributed
from ftlab.select.datastore import part_path

SPEC = ProjectionSpec(dim_in=300, dim_out=32, seed=3)
FIELDS = dict(model="tiny", checkpoint="epoch-1", grad_type="adam", dim=32, dtype="float16", projection=SPEC)
IDS = [f"pool/{'ab'[i % 2]}.jsonl:{i // 2 + 1}" for i in range(45)]


def features(indices: list[int]) -> torch.Tensor:
    """Projected stand-in gradients: example ``i``'s vector depends only on ``i``."""
    x = torch.stack([torch.randn(SPEC.dim_in, generator=torch.Generator().manual_seed(i)) for i in indices])
    return Projector(SPEC).project(x)


SCRIPT = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    import torch.distributed as dist
    from test_datastore_distributed import IDS, FIELDS, features
    from ftlab.select import write_distributed

    calls = 0

    def compute(indices):
        global calls
        calls += 1
        return features(indices)

    store = write_distributed(sys.argv[1], IDS, compute, batch_size=4, shard_rows=5, **FIELDS)
    print(f"rank {{os.environ['RANK']}} rows {{len(store)}} calls {{calls}}", flush=True)
    dist.destroy_process_group()
""")


def test_two_ranks_write_the_single_process_store(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = write_distributed(tmp_path / "single", IDS, features, batch_size=4, shard_rows=5, **FIELDS)
    out = tmp_path / "dp"
    # The state a crash of rank 1 in its 3rd batch leaves (see test_datastore.py for a real
    # SIGKILL): its part lists one durable shard of 5 rows; the 3 rows buffered after it are lost.
    mine = list(range(1, len(IDS), 2))
    crashed = DatastoreWriter(part_path(out, 1, 2), shard_rows=5, **FIELDS)
    crashed.append([IDS[i] for i in mine[:8]], features(mine[:8]))
    del crashed

    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    # Rank 0 computes its 23 examples (6 batches of 4); rank 1 resumes: 22 - 5 durable = 17 (5 batches).
    assert "rank 0 rows 45 calls 6" in run.stdout and "rank 1 rows 45 calls 5" in run.stdout
    dp = Datastore.open(out)
    assert dp.ids == single.ids == IDS
    assert dp.manifest.identity() == single.manifest.identity()
    assert np.array_equal(dp.read(0, len(dp)), single.read(0, len(single)))
    assert dp.manifest.shards == single.manifest.shards  # same bytes, shard by shard
    assert not out.with_name("dp.parts").exists()  # parts removed after the merge
