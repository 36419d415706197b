"""What the reliability checksums cost: checksum speed, trajectory-log records, datastore reads.

    python benchmarks/checksum_cost.py
    python benchmarks/checksum_cost.py --quick      # small sizes: a smoke run of a few seconds

Measured side by side in one process, the variants of each comparison alternating round by
round (so drift and other jobs on the machine hit them alike); each is reported as best-of and
median over `--repeats` rounds:

(a) Checksum throughput over a 256 MB buffer in memory (`os.urandom`): `zlib.crc32`,
    `hashlib.sha256`, `hashlib.blake2b`, in GB/s (10^9 bytes).
(b) The trajectory log (`ftlab.zo.trajectory`): packing one record with its CRC-32
    (`pack_record`) against the bare 16-byte `struct.pack("<IIff", ...)` of format 1, over 200k
    records; a whole `TrajectoryLog.append` of one step (n=1), 5000 appends into a fresh temp
    folder per round, against format 1's append (open for append, write 16 bytes); and reading
    that log back with `steps()` (every record's CRC and the step sequence checked). In µs.
(c) Reading a whole float16 datastore of `--size-gib` GiB (rows x 8192; 1 GiB = 65536 rows in
    32 shards of 2048 rows), written once with `DatastoreWriter` into a temporary folder under
    /tmp (deleted at the end): `for _ in Datastore.open(path, verify=v).iter_chunks(4096)`
    with v=True (CRC-32 of each shard before its first row, the default) and v=False,
    alternating, after one warm-up of each (warm page cache); the CRC-32 of every shard alone
    (through a read-only map, as the reader does); and `Datastore.verify()` (SHA-256). In
    seconds per GiB; the verification's extra cost is the difference of the medians.
(e) A first-order checkpoint of `--checkpoint-mb` MB of float32 trainable tensors (default 540:
    SmolLM2-135M fully fine-tuned) with AdamW's state (twice that), in a temp folder under /tmp:
    `ftlab.checkpoint.save_checkpoint` (which writes the sha256 manifest, fsyncs and commits the
    folder), `ftlab.io.write_manifest` alone (hashing every file again: the manifest's share of a
    save) and `verify_checkpoint` (what every resume now does before loading), alternating. In
    seconds, and s/GiB of checkpoint.
(d) One MeZO step of the embedded SmolLM2-135M (fp32, a batch of 16 x 128 random ids, the LM
    loss `model(input_ids=ids, labels=ids).loss` as closure, `ftlab.zo.MeZO(lr=1e-6)`): one
    warm-up, then the median of 3 steps; the log append's cost is given as a fraction of it.

Writes benchmarks/results/checksum_cost.json (with --quick: checksum_cost_quick.json) with the
machine: CPU count and model, torch and zlib versions, and the load average at start and end
(the numbers are only comparable on an otherwise idle machine; they are recorded, not waited for:
on a loaded 2-core machine torch's 2 threads wait for each other at every operation, which
slows the MeZO step most; `--threads 1` shows by how much).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import torch

from _common import RESULTS, clock, interleaved, machine, median, table, timed, write_json

DIM = 8192
SHARD_ROWS = 2048
CHUNK_ROWS = 4096


def stats(times: list[float]) -> dict[str, float]:
    return {"best": min(times), "median": median(times), "runs": times}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


# -- (a) checksum throughput -----------------------------------------------------------------------
def checksums(megabytes: int, repeats: int) -> dict[str, dict]:
    data = os.urandom(megabytes << 20)
    fns = {"crc32": lambda: zlib.crc32(data),
           "sha256": lambda: hashlib.sha256(data).digest(),
           "blake2b": lambda: hashlib.blake2b(data).digest()}
    times = interleaved(fns, repeats, order="rotate")
    out = {}
    for name, t in times.items():
        out[name] = {**stats(t), "gb_per_s_best": len(data) / min(t) / 1e9,
                     "gb_per_s_median": len(data) / median(t) / 1e9}
        print(f"  (a) {name:8s} {out[name]['gb_per_s_best']:5.2f} GB/s best, "
              f"{out[name]['gb_per_s_median']:5.2f} median", flush=True)
    return out


# -- (b) trajectory log ----------------------------------------------------------------------------
def trajectory(records: int, appends: int, repeats: int) -> dict[str, dict]:
    from ftlab.zo.mezo import MeZO, ZOStep
    from ftlab.zo.trajectory import TrajectoryLog, pack_record

    bare = struct.Struct("<IIff")

    def pack_v2() -> None:
        for i in range(records):
            pack_record(i, 12345, 0.5, 1e-6)

    def pack_v1() -> None:
        for i in range(records):
            bare.pack(i, 12345, 0.5, 1e-6)

    z = MeZO([torch.nn.Parameter(torch.zeros(1))], lr=1e-6).z_spec()
    steps = [ZOStep([1000 + i], [0.25], 1e-6, 0.0) for i in range(appends)]
    folders: list[str] = []

    def append_v2() -> None:
        folder = tempfile.mkdtemp(prefix="ftlab-checksum-log-", dir=base)
        folders.append(folder)
        log = TrajectoryLog(folder, run_id="bench", z=z)
        for i, record in enumerate(steps):
            log.append(i, record)

    def append_v1() -> None:  # format 1: open for append, write the bare record
        path = Path(tempfile.mkdtemp(prefix="ftlab-checksum-v1-", dir=base)) / "trajectory.bin"
        for i, record in enumerate(steps):
            with path.open("ab") as f:
                f.write(bare.pack(i, record.seeds[0], record.grads[0], record.lr))

    def read_v2() -> None:
        log = TrajectoryLog(folders[-1])
        n = sum(1 for _ in log.steps())
        assert n == appends, n

    with tempfile.TemporaryDirectory(prefix="ftlab-checksum-", dir="/tmp") as base:
        packs = interleaved({"pack_record": pack_v2, "struct_pack": pack_v1}, repeats, order="rotate")
        writes = interleaved({"append": append_v2, "append_v1": append_v1}, repeats, order="rotate")
        reads = interleaved({"steps_read_verify": read_v2}, repeats)
    out = {}
    for name, t in packs.items():
        out[name] = {**stats(t), "us_best": min(t) / records * 1e6, "us_median": median(t) / records * 1e6}
    for name, t in {**writes, **reads}.items():
        out[name] = {**stats(t), "us_best": min(t) / appends * 1e6, "us_median": median(t) / appends * 1e6}
    for name, r in out.items():
        print(f"  (b) {name:18s} {r['us_best']:7.2f} µs best, {r['us_median']:7.2f} median", flush=True)
    return out


# -- (c) datastore ---------------------------------------------------------------------------------
def datastore(size_gib: float, repeats: int) -> dict[str, object]:
    from ftlab.select.datastore import Datastore, DatastoreWriter, _digest

    rows = max(SHARD_ROWS, int(round(size_gib * 2**30 / (DIM * 2))) // SHARD_ROWS * SHARD_ROWS)
    gib = rows * DIM * 2 / 2**30
    with tempfile.TemporaryDirectory(prefix="ftlab-checksum-store-", dir="/tmp") as tmp:
        path = Path(tmp) / "store"
        with clock() as writing:
            writer = DatastoreWriter(path, model="m", checkpoint="c", grad_type="adam", dim=DIM, dtype="float16",
                                     projection=None, shard_rows=SHARD_ROWS)
            gen = torch.Generator().manual_seed(0)
            for lo in range(0, rows, SHARD_ROWS):
                writer.append([str(i) for i in range(lo, lo + SHARD_ROWS)],
                              torch.randn(SHARD_ROWS, DIM, generator=gen))
            writer.close()
        write_s = writing.seconds
        shards = Datastore.open(path).manifest.shards
        print(f"  (c) wrote {rows} x {DIM} float16 = {gib:.3f} GiB in {len(shards)} shards ({write_s:.1f} s)",
              flush=True)

        def read(verify: bool) -> Callable[[], None]:
            def run() -> None:
                for _ in Datastore.open(path, verify=verify).iter_chunks(CHUNK_ROWS):
                    pass
            return run

        def crc_all() -> None:
            for shard in shards:
                _digest(path / shard["file"], "crc32")

        times = interleaved({"read_verify_true": read(True), "read_verify_false": read(False),
                             "crc32_all_shards": crc_all,
                             "verify_sha256": lambda: Datastore.open(path, verify=False).verify()},
                            repeats, order="rotate")
    out: dict[str, object] = {"rows": rows, "dim": DIM, "gib": gib, "shards": len(shards), "write_s": write_s}
    for name, t in times.items():
        out[name] = {**stats(t), "s_per_gib_best": min(t) / gib, "s_per_gib_median": median(t) / gib}
        print(f"  (c) {name:18s} {min(t) / gib:6.3f} s/GiB best, {median(t) / gib:6.3f} median", flush=True)
    extra_median = (median(times["read_verify_true"]) - median(times["read_verify_false"])) / gib
    extra_best = (min(times["read_verify_true"]) - min(times["read_verify_false"])) / gib
    out["verify_extra_s_per_gib"] = {"median": extra_median, "best": extra_best}
    print(f"  (c) verification's extra cost: {extra_median:.3f} s/GiB (medians), {extra_best:.3f} (bests)", flush=True)
    return out


# -- (e) checkpoint manifests ----------------------------------------------------------------------
def checkpoint_manifest(megabytes: int, repeats: int) -> dict[str, object]:
    from ftlab.checkpoint import save_checkpoint, verify_checkpoint
    from ftlab.io import write_manifest

    rows = max(1, (megabytes << 20) // 4 // 4 // 1024)  # four float32 tensors of rows x 1024
    gen = torch.Generator().manual_seed(0)
    module = torch.nn.ParameterDict({f"w{i}": torch.nn.Parameter(torch.randn(rows, 1024, generator=gen))
                                     for i in range(4)})
    optimizer = torch.optim.AdamW(module.parameters())
    sum(p.sum() for p in module.parameters()).backward()
    optimizer.step()  # AdamW's two moments exist
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with tempfile.TemporaryDirectory(prefix="ftlab-checksum-ckpt-", dir="/tmp") as tmp:
        path = Path(tmp) / "checkpoint"
        save = lambda: save_checkpoint(path, module, optimizer, scheduler,  # noqa: E731
                                       {"step": 1, "best_score": None, "best_step": None})
        save()
        size = sum(f.stat().st_size for f in path.iterdir())
        times = interleaved({"save_checkpoint": save, "write_manifest": lambda: write_manifest(path),
                             "verify_checkpoint": lambda: verify_checkpoint(path)}, repeats, order="rotate")
    gib = size / 2**30
    out: dict[str, object] = {"trainable_mb": megabytes, "checkpoint_bytes": size}
    for name, t in times.items():
        out[name] = {**stats(t), "s_per_gib_best": min(t) / gib, "s_per_gib_median": median(t) / gib}
        print(f"  (e) {name:18s} {median(t):7.3f} s median ({median(t) / gib:6.3f} s/GiB of a {gib:.3g} GiB "
              f"checkpoint)", flush=True)
    out["manifest_fraction_of_save"] = median(times["write_manifest"]) / median(times["save_checkpoint"])
    return out


# -- (d) a MeZO step ----------------------------------------------------------------------------------
def mezo_step(batch: int, length: int, repeats: int) -> dict[str, object]:
    from ftlab.models import load_model
    from ftlab.zo import MeZO

    model, tokenizer = load_model("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tokenizer), (batch, length), generator=gen)
    opt = MeZO(model.parameters(), lr=1e-6)
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    times = timed(lambda: opt.step(closure), repeats)  # after one warm-up step
    out = {"batch": batch, "length": length, **stats(times)}
    print(f"  (d) MeZO step ({batch} x {length}): {median(times):.3f} s median, {min(times):.3f} best",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="datastore size (default 1 GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per comparison after the warm-up")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--checkpoint-mb", type=int, default=540,
                        help="trainable float32 MB of the checkpoint in (e) (default 540: SmolLM2-135M, full)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own, one per core); on a machine loaded by other "
                             "jobs 1 can be faster")
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/checksum_cost.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = {"buffer_mb": 16, "records": 20_000, "appends": 500, "size_gib": 1 / 16, "batch": 2, "length": 32,
                 "checkpoint_mb": 16}
    else:
        sizes = {"buffer_mb": 256, "records": 200_000, "appends": 5000, "size_gib": args.size_gib,
                 "batch": 16, "length": 128, "checkpoint_mb": args.checkpoint_mb}
    output = args.output or RESULTS / ("checksum_cost_quick.json" if args.quick else "checksum_cost.json")

    info = machine(cpu_model=cpu_model(), zlib=zlib.ZLIB_RUNTIME_VERSION, platform=platform.platform())
    load_start = info["loadavg"]
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}, zlib {info['zlib']}; "
          f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    with clock() as total:
        a = checksums(sizes["buffer_mb"], args.repeats)
        b = trajectory(sizes["records"], sizes["appends"], args.repeats)
        c = datastore(sizes["size_gib"], args.repeats)
        e = checkpoint_manifest(sizes["checkpoint_mb"], args.repeats)
        d = mezo_step(sizes["batch"], sizes["length"], args.repeats)
    load_end = os.getloadavg()

    step_s = d["median"]
    append_us = b["append"]["us_median"]
    crc_extra_us = b["pack_record"]["us_median"] - b["struct_pack"]["us_median"]
    summary = {
        "append_fraction_of_mezo_step": append_us * 1e-6 / step_s,
        "record_crc_extra_us": crc_extra_us,
        "record_crc_fraction_of_mezo_step": crc_extra_us * 1e-6 / step_s,
        "verify_extra_s_per_gib": c["verify_extra_s_per_gib"]["median"],
        "checkpoint_manifest_fraction_of_save": e["manifest_fraction_of_save"],
        "checkpoint_verify_s_per_gib": e["verify_checkpoint"]["s_per_gib_median"],
    }

    def span(r: dict, key: str, fmt: str) -> str:
        return f"{r[key + '_best']:{fmt}} best / {r[key + '_median']:{fmt}} median"

    gib = c["gib"]
    rows = [
        (f"CRC-32 (zlib), {sizes['buffer_mb']} MB in memory", span(a["crc32"], "gb_per_s", ".2f") + " GB/s"),
        (f"SHA-256, {sizes['buffer_mb']} MB in memory", span(a["sha256"], "gb_per_s", ".2f") + " GB/s"),
        (f"BLAKE2b, {sizes['buffer_mb']} MB in memory", span(a["blake2b"], "gb_per_s", ".2f") + " GB/s"),
        ("pack_record (with CRC-32)", span(b["pack_record"], "us", ".2f") + " µs"),
        ('struct.pack("<IIff") (format 1)', span(b["struct_pack"], "us", ".2f") + " µs"),
        ("TrajectoryLog.append, one step (n=1)", span(b["append"], "us", ".1f") + " µs"),
        ("format-1 append (open, write 16 bytes)", span(b["append_v1"], "us", ".1f") + " µs"),
        ("steps() read + verify", span(b["steps_read_verify"], "us", ".2f") + " µs a step"),
        (f"read {gib:.3g} GiB store, verify=False", span(c["read_verify_false"], "s_per_gib", ".3f") + " s/GiB"),
        (f"read {gib:.3g} GiB store, verify=True", span(c["read_verify_true"], "s_per_gib", ".3f") + " s/GiB"),
        ("verification's extra cost", f"{c['verify_extra_s_per_gib']['best']:.3f} best / "
                                      f"{summary['verify_extra_s_per_gib']:.3f} median s/GiB"),
        ("CRC-32 of all shards (mmap)", span(c["crc32_all_shards"], "s_per_gib", ".3f") + " s/GiB"),
        ("Datastore.verify() (SHA-256)", span(c["verify_sha256"], "s_per_gib", ".3f") + " s/GiB"),
        (f"MeZO step, SmolLM2-135M, {d['batch']} x {d['length']}",
         f"{d['best']:.3f} best / {d['median']:.3f} median s"),
        ("append / MeZO step", f"{summary['append_fraction_of_mezo_step']:.2e}"),
        ("record CRC-32 / MeZO step", f"{summary['record_crc_fraction_of_mezo_step']:.2e}"),
        (f"save_checkpoint, {e['checkpoint_bytes'] / 2**30:.3g} GiB (with its manifest)",
         span(e["save_checkpoint"], "s_per_gib", ".3f") + " s/GiB"),
        ("its sha256 manifest alone", span(e["write_manifest"], "s_per_gib", ".3f") + " s/GiB"),
        ("manifest / save_checkpoint", f"{summary['checkpoint_manifest_fraction_of_save']:.2f}"),
        ("verify_checkpoint (every resume)", span(e["verify_checkpoint"], "s_per_gib", ".3f") + " s/GiB"),
    ]
    print(f"\nload average: start {load_start[0]:.2f}, end {load_end[0]:.2f} (1 min); "
          f"{total.seconds:.0f} s in all")
    print("\n" + table(rows, ("what", "number"), markdown=True))
    output = write_json(output.absolute(), {
        "command": " ".join(["python", "benchmarks/checksum_cost.py", *sys.argv[1:]]), "quick": args.quick,
        "sizes": sizes, "repeats": args.repeats,
        "machine": {**info, "loadavg_start": load_start, "loadavg_end": load_end},
        "checksums": a, "trajectory": b, "datastore": c, "mezo_step": d, "checkpoint": e, "summary": summary})
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
