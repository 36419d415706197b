"""A datastore written by 2 ``torchrun`` processes (gloo) equals the single-process one, also
when a rank dies mid-way and the command is rerun."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from ftlab.select import Datastore, ProjectionSpec, Projector, write_distributed

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

    out, die_after = sys.argv[1], int(sys.argv[2])
    calls = 0

    def compute(indices):
        global calls
        calls += 1
        if os.environ["RANK"] == "1" and calls > die_after:
            os._exit(3)  # a crash: no cleanup, buffered rows lost
        return features(indices)

    store = write_distributed(out, IDS, compute, batch_size=4, shard_rows=5, **FIELDS)
    print(f"rank {{os.environ['RANK']}} rows {{len(store)}} calls {{calls}}", flush=True)
    dist.destroy_process_group()
""")


def _torchrun(tmp_path, out, die_after: int) -> subprocess.CompletedProcess:
    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out), str(die_after)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def test_two_ranks_write_the_single_process_store(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = write_distributed(tmp_path / "single", IDS, features, batch_size=4, shard_rows=5, **FIELDS)
    out = tmp_path / "dp"

    crashed = _torchrun(tmp_path, out, die_after=2)  # rank 1 dies in its 3rd batch
    assert crashed.returncode != 0
    part1 = out.with_name("dp.parts") / "rank1-of-2"
    assert (part1 / "manifest.json").exists() and not (out / "manifest.json").exists()

    resumed = _torchrun(tmp_path, out, die_after=10**6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 1 has 22 examples; its 2 batches before the crash made one durable shard of 5 rows, so
    # 17 examples (5 batches) are left. (How far rank 0 got before torchrun stopped it varies.)
    assert "rank 1 rows 45 calls 5" in resumed.stdout and "rank 0 rows 45" in resumed.stdout
    dp = Datastore.open(out)
    assert dp.ids == single.ids == IDS
    assert dp.manifest.identity() == single.manifest.identity()
    assert np.array_equal(dp.read(0, len(dp)), single.read(0, len(single)))
    assert dp.manifest.shards == single.manifest.shards  # same bytes, shard by shard
    assert not out.with_name("dp.parts").exists()  # parts removed after the merge
