"""ftlab's LESS side by side with bergson, TRAK and Kronfluence (and representation / random floors).

    python benchmarks/less_peers.py                  # CPU size: 32 pool examples, 8 targets, 256 tokens
    python benchmarks/less_peers.py --quick          # smoke size: 16 pool examples, 4 targets, 128 tokens
    python benchmarks/less_peers.py --train-epochs 2 # (C) also LoRA-train on each selection

The peers live in their own venv (``--peers-python``), so the project's venv stays clean; it
sees the project's packages (torch, transformers, peft, datasets) through a .pth file. Built with::

    python3.11 -m venv /work/peers-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /work/peers-venv/lib/python3.11/site-packages/main.pth
    P=/work/peers-venv/bin/pip; echo "torch==2.13.0+cpu" > /tmp/c.txt
    $P install --no-deps bergson==2.5.1 traker==0.3.2 kronfluence==1.0.1 einconv==0.1.0 torchopt==0.7.3
    $P install -c /tmp/c.txt jaxtyping ml_dtypes natsort petname simple-parsing psutil optree einops opt_einsum

(--no-deps: bergson declares torchvision, torchaudio and bitsandbytes and kronfluence torchvision,
none of which these code paths import; with them pip pulls torch 2.14 and the CUDA wheels.)
Every method runs in a fresh subprocess of that
interpreter (so its peak RSS is its own) on the same model (``--model``, the embedded
SmolLM2-135M), the same ``--n`` examples drawn from the default evals pool
(``ftlab.select.pool.build_evals_pool``) and the same ``--n-target`` examples of a held-out
target family, encoded once by ``ftlab.select.data.encode`` (prompt + response, loss on the
response only, mean over its tokens).

(A) per method: seconds of the pool pass (model loading and, for LESS, the warm-up are timed
    apart), examples and tokens per second, peak RSS (and its rise over the loaded model),
    the size of what it writes to disk. The LoRA-gradient methods (ftlab, bergson, TRAK,
    Kronfluence) all see the same LoRA adapters (q, v of the last ``--lora-layers`` layers, r=8)
    with the weights of ftlab's warm-up checkpoint, so only the gradient / projection / scoring
    machinery differs: fresh LoRA has B = 0, whose A gradients vanish.
(B) each method's scores of the pool against the targets, its top ``--fraction``, the pool
    families it picks, and the Jaccard overlap between the methods' selections.
(C) with ``--train-epochs N``: LoRA (the same recipe and seed as benchmarks/less_quality.py) on
    each selection, then the mean response NLL on the target family's held-out examples with a
    bootstrap 95% interval over those examples (beside the untrained base).

Resumable: each finished method leaves ``<work>/<method>/result.json`` and is not rerun (delete
it to redo one). Writes ``benchmarks/results/less_peers.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from _common import RESULTS, clock, machine, package_version, read_json, table, write_json

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
METHODS = ("ftlab", "bergson", "bergson_adam", "trak", "kronfluence", "representation", "random")
PEERS = {"ftlab": "ftlab", "bergson": "bergson", "bergson_adam": "bergson", "trak": "traker",
         "kronfluence": "kronfluence"}
# What each method takes the gradient of / what its features are (the table says it).
GRADS_OF = {"ftlab": "LoRA, Adam-preconditioned (LESS)", "bergson": "LoRA (hooks; no optimizer normalizer)",
            "bergson_adam": "LoRA (hooks), / sqrt(ftlab warm-up Adam v)",
            "trak": "LoRA (vmap over all weights, kept: LoRA)", "kronfluence": "LoRA modules, EK-FAC",
            "representation": "none (mean last hidden state)", "random": "none"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=32, help="pool examples (drawn from the default evals pool)")
    p.add_argument("--n-target", type=int, default=8, help="target examples (selection) of the target family")
    p.add_argument("--n-eval", type=int, default=24, help="(C) held-out target examples (evaluation)")
    p.add_argument("--target-family", default="lexicon", help="one of the pool's held-out target families")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dim", type=int, default=8192, help="projection dimension (ftlab, bergson, TRAK)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trak-batch-size", type=int, default=2,
                   help="TRAK's batch: its vmap keeps every weight's per-example gradient (12.7 GB peak at 8 x 128 "
                        "tokens on SmolLM2-135M), so a smaller batch keeps it within a shared CPU machine")
    p.add_argument("--lora-layers", type=int, default=4, help="LoRA on q,v of the last N layers (0: all)")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--train-epochs", type=int, default=0, help="(C) LoRA epochs on each selection (0: skip)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke size: --n 16 --n-target 4 --n-eval 8 --max-length 128")
    p.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    p.add_argument("--work", default="runs/less_peers")
    p.add_argument("--output", default=str(RESULTS / "less_peers.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_target, args.n_eval, args.max_length = 16, 4, 8, 128
    args.device = "cpu"
    return args


# ---------------------------------------------------------------- data (parent)

def prepare_data(args: argparse.Namespace, work: Path) -> dict:
    """``<work>/data/{pool,target,eval}.jsonl``: ``--n`` examples drawn from the default evals pool
    and the first ``--n-target`` / next ``--n-eval`` examples of the target family's file."""
    import random

    from ftlab.select.pool import PoolSpec, build_evals_pool

    data = work / "data"
    built = build_evals_pool(work / "pool", PoolSpec(), progress=False)
    if args.target_family not in built.targets:
        raise SystemExit(f"--target-family {args.target_family!r}: not a target family of the pool "
                         f"({', '.join(built.targets)})")
    pool_rows = built.pool.read_text().splitlines()
    target_rows = built.targets[args.target_family].read_text().splitlines()
    picked = sorted(random.Random(args.seed).sample(range(len(pool_rows)), args.n))
    random.Random(args.seed).shuffle(target_rows)
    data.mkdir(parents=True, exist_ok=True)
    files = {"pool": [pool_rows[i] for i in picked], "target": target_rows[:args.n_target],
             "eval": target_rows[args.n_target:args.n_target + args.n_eval]}
    for name, rows in files.items():
        (data / f"{name}.jsonl").write_text("".join(r + "\n" for r in rows))
    return {"pool_size": len(pool_rows), "pool_source": built.manifest.get("source", {}).get("requirement"),
            "target_family_size": len(target_rows), **{f"n_{k}": len(v) for k, v in files.items()}}


# ---------------------------------------------------------------- helpers shared by the children

def lora_settings(args: argparse.Namespace, n_layers: int):
    from less_quality import lora_settings as quality_lora

    return quality_lora(args, n_layers)


def peak_rss() -> int | None:
    from ftlab.memory import status_bytes

    return status_bytes("VmHWM")


def rss_now() -> int | None:
    from ftlab.memory import status_bytes

    return status_bytes("VmRSS")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def encoded(tok, examples, max_length: int) -> list[tuple[list[int], int]]:
    from ftlab.select.data import encode

    return [encode(tok, ex, max_length) for ex in examples]


def hf_rows(rows: list[tuple[list[int], int]]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` with -100 on the prompt: the HF convention the peers take."""
    return [(ids, [-100] * (len(ids) - n) + ids[len(ids) - n:]) for ids, n in rows]


def right_padded(rows: list[tuple[list[int], list[int]]], pad: int):
    """input_ids, attention_mask, labels of ``rows`` (HF ``(ids, labels)`` pairs), right-padded."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return ids, mask, labels


def mean_response_nll(logits, labels):
    """Per-row mean next-token NLL over the label positions (labels -100 elsewhere)."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    valid = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1),
                          reduction="none").view_as(labels)
    return (nll * valid).sum(1) / valid.sum(1)


class Child:
    """What every method's subprocess shares: the data, the model with ftlab's warm-up LoRA, timing."""

    def __init__(self, args: argparse.Namespace, work: Path):
        from ftlab.select.data import load_instructions

        self.args, self.work = args, work
        self.out = work / args.child
        self.pool = load_instructions([work / "data" / "pool.jsonl"])
        self.targets = load_instructions([work / "data" / "target.jsonl"])

    def base(self):
        from ftlab.models import load_model

        return load_model(self.args.model, device="cpu", attn_implementation="eager")

    def config(self, base):
        from ftlab.select.pipeline import SelectConfig
        from ftlab.select.warmup import WarmupSettings

        a = self.args
        return SelectConfig(pool=[str(self.work / "data" / "pool.jsonl")], output_dir=str(self.work / "ftlab"),
                            model=a.model, device="cpu", projection_dim=a.dim, batch_size=a.batch_size,
                            max_length=a.max_length, seed=a.seed,
                            lora=lora_settings(a, base.config.num_hidden_layers),
                            warmup=WarmupSettings(percentage=0.25, epochs=1, lr=a.lr, batch_size=4, seed=a.seed))

    def warm_lora_model(self):
        """The base model with ftlab's LoRA adapters, loaded with the warm-up checkpoint's weights."""
        from ftlab.select.pipeline import load_lora_model
        from ftlab.select.warmup import list_checkpoints, load_checkpoint_into

        base, tok = self.base()
        module, tok = load_lora_model(self.config(base), base, tok)
        ckpts = list_checkpoints(self.work / "ftlab" / "warmup")
        if not ckpts:
            raise RuntimeError("no ftlab warm-up checkpoint yet: run the ftlab method first")
        load_checkpoint_into(module, ckpts[-1])
        return module, tok


def run_ftlab(c: Child) -> dict:
    from ftlab.select.pipeline import gradient_features, groups_of, load_lora_model
    from ftlab.select.scoring import less_scores
    from ftlab.select.warmup import run_warmup

    base, tok = c.base()
    cfg = c.config(base)
    module, tok = load_lora_model(cfg, base, tok)
    with clock() as warm:
        ckpts = run_warmup(module, tok, c.pool, cfg.warmup, c.out / "warmup", max_length=c.args.max_length)
    loaded = rss_now()
    reset()
    with clock() as feats:
        train = gradient_features(cfg, module, tok, c.pool, ckpts, "adam", "train", progress=False)
    peak = peak_rss()
    tgt = gradient_features(cfg, module, tok, c.targets, ckpts, "sgd", "target", progress=False)
    scores = less_scores(train.stores, tgt.stores, train.lr_weights, groups_of(tgt.stores[0], c.targets))
    return {"seconds": feats.seconds, "loaded_rss": loaded, "peak_rss": peak, "scores": scores,
            "store_bytes": folder_bytes(c.out / "features" / "train"), "dim": c.args.dim,
            "n_tokens": sum(len(ids) for ids, _ in encoded(tok, c.pool, c.args.max_length)),
            "extra_seconds": {"warmup (not in the pool pass)": warm.seconds},
            "notes": f"1 warm-up checkpoint, sparse JL projection, float16 store; "
                     f"skipped {len(train.skipped)}"}


def run_bergson_adam(c: Child) -> dict:
    return run_bergson(c, adam=True)


def run_bergson(c: Child, adam: bool = False) -> dict:
    import numpy as np
    from bergson import GradientProcessor, IndexConfig, collect_gradients, load_gradients
    from bergson.config.config import PreprocessConfig
    from bergson.data import allocate_batches
    from bergson.gradients import AdamNormalizer
    from bergson.utils.worker_utils import extract_peft_target_modules
    from datasets import Dataset

    from ftlab.select.warmup import list_checkpoints, load_adam_state

    module, tok = c.warm_lora_model()
    targets = extract_peft_target_modules(module)
    a = c.args
    normalizers = {}
    if adam:  # bergson's own optimizer normalizer (g / sqrt(v)), fed the warm-up's AdamW second moments
        state = load_adam_state(list_checkpoints(c.work / "ftlab" / "warmup")[-1].path)
        normalizers = {n.removeprefix("base_model.").removesuffix(".weight"): AdamNormalizer(v.clone())
                       for n, (_, v) in state.items()}
        missing = sorted(set(targets) - set(normalizers))
        if missing:
            raise RuntimeError(f"no Adam moments for {missing[0]} ({len(missing)} modules)")

    def index(examples, name):
        rows = hf_rows(encoded(tok, examples, a.max_length))
        ds = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                                "length": [len(r[0]) for r in rows]})
        cfg = IndexConfig(run_path=str(c.out / name), model=a.model, projection_dim=a.dim, projection_target="global",
                          projection_seed=a.seed, loss_reduction="mean", token_batch_size=a.batch_size * a.max_length,
                          max_batch_size=a.batch_size)
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = GradientProcessor(normalizers, projection_dim=a.dim, projection_target="global",
                                      projection_seed=a.seed)
        batches = allocate_batches(ds["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
        collect_gradients(module, ds, processor, cfg, batches=batches, target_modules=targets,
                          preprocess_cfg=PreprocessConfig(unit_normalize=True))
        return np.asarray(load_gradients(str(cfg.partial_run_path)), dtype=np.float32), cfg.partial_run_path

    module.train(False)
    loaded = rss_now()
    reset()
    with clock() as feats:
        pool, path = index(c.pool, "pool")
    peak = peak_rss()
    tgt, _ = index(c.targets, "target")
    pool, tgt = structured_to_plain(pool), structured_to_plain(tgt)
    scores = (unit(pool) @ unit(tgt).T).mean(1)
    return {"seconds": feats.seconds, "loaded_rss": loaded, "peak_rss": peak, "scores": scores,
            "store_bytes": folder_bytes(path), "dim": pool.shape[1],
            "notes": ("AdamNormalizer from the warm-up's exp_avg_sq; " if adam else "")
            + "projection_target=global (one d-vector per example), unit-normalised, float32 store; "
              "scores: mean cosine to the targets"}


def structured_to_plain(x):
    """bergson stores one named field per module; a ``(N, dim)`` float32 array either way."""
    import numpy as np

    if x.dtype.names:
        return np.concatenate([np.asarray(x[n], dtype=np.float32).reshape(len(x), -1) for n in x.dtype.names], 1)
    return x.astype(np.float32)


def unit(x):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_trak(c: Child) -> dict:
    import torch
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    from ftlab.grads.masks import row_attention_mask
    from ftlab.models import trainable_parameters
    from ftlab.objectives import ModelBatch, target_logprobs
    from ftlab.select.data import collate

    module, tok = c.warm_lora_model()
    a = c.args
    config = module.config

    class Functional(torch.nn.Module):
        def __init__(self, weights, buffers):
            super().__init__()
            self.w, self.b = weights, buffers

        def forward(self, **kw):
            return torch.func.functional_call(module, (self.w, self.b), args=(), kwargs=kw)

    class LMOutput(AbstractModelOutput):
        """TRAK's model output for an LM: the mean response-token log-probability (its gradient is
        minus the LESS loss gradient); the out-to-loss term is 1 - its exp (the mean token
        probability's complement, TRAK's classification weighting)."""

        def __init__(self):
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, ids, mask, pos, labels):
            row = ModelBatch(ids[None], row_attention_mask(config, mask, torch.float32), pos[None], labels[None],
                             n_options=1, gold=None)
            return target_logprobs(Functional(weights, buffers), row)[0]

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            ids, mask, pos, labels = batch
            with torch.no_grad():
                lp = target_logprobs(module, ModelBatch(ids, mask, pos, labels, n_options=1, gold=None))
            return (1 - lp.exp()).unsqueeze(-1)

    names = [n for n, _ in trainable_parameters(module)]
    grad_dim = sum(p.numel() for _, p in trainable_parameters(module))
    module.train(False)
    loaded = rss_now()
    reset()
    store = c.out / "store"
    with clock() as feats:
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=a.dim, seed=a.seed,
                                   proj_type=ProjectionType.rademacher, device="cpu")
        traker = TRAKer(model=module, task=LMOutput(), train_set_size=len(c.pool), save_dir=str(store),
                        device="cpu", projector=projector, proj_dim=a.dim,
                        use_half_precision=False, grad_wrt=names, logging_level=40)
        traker.load_checkpoint(module.state_dict(), model_id=0)
        rows = encoded(tok, c.pool, a.max_length)
        for i in range(0, len(rows), a.trak_batch_size):
            b = collate(rows[i:i + a.trak_batch_size], tok.pad_token_id)
            traker.featurize(batch=(b.input_ids, b.attention_mask, b.position_ids, b.labels),
                             num_samples=len(rows[i:i + a.trak_batch_size]))
        g = torch.as_tensor(traker.saver.current_store["grads"]).float()
        # N < d makes X^T X singular: damp it by 0.1 x its mean diagonal (TRAK's lambda_reg, default 0)
        traker.score_computer.lambda_reg = 0.1 * float((g * g).sum(0).mean())
        traker.finalize_features()
    peak = peak_rss()
    trows = encoded(tok, c.targets, a.max_length)
    traker.start_scoring_checkpoint(exp_name="targets", checkpoint=module.state_dict(), model_id=0,
                                    num_targets=len(trows))
    for i in range(0, len(trows), a.trak_batch_size):
        b = collate(trows[i:i + a.trak_batch_size], tok.pad_token_id)
        traker.score(batch=(b.input_ids, b.attention_mask, b.position_ids, b.labels),
                     num_samples=len(trows[i:i + a.trak_batch_size]))
    scores = torch.as_tensor(traker.finalize_scores(exp_name="targets")).float()  # (train, targets)
    return {"seconds": feats.seconds, "loaded_rss": loaded, "peak_rss": peak, "scores": scores.mean(1).numpy(),
            "store_bytes": folder_bytes(store), "dim": a.dim,
            "notes": f"batch {a.trak_batch_size}; BasicProjector (CPU; its CUDA projector needs a GPU), float32, "
                     "lambda_reg = 0.1 x mean diag(X^T X); finalize_features (X^T X inverse) counted in the pass"}


def run_kronfluence(c: Child) -> dict:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    module, tok = c.warm_lora_model()
    a = c.args
    tracked = [n for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and (".lora_A." in n + "." or ".lora_B." in n + ".")]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:  # the true Fisher: labels drawn from the model at the response positions
                with torch.no_grad():
                    drawn = torch.multinomial(logits[:, :-1].float().softmax(-1).flatten(0, 1), 1).view(
                        labels.shape[0], -1)
                labels = torch.cat([labels[:, :1], torch.where(labels[:, 1:] != -100, drawn, -100)], 1)
            return mean_response_nll(logits, labels).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.rows = hf_rows(encoded(tok, examples, a.max_length))

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    def collate(rows):
        ids, mask, labels = right_padded(rows, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    module.train(False)
    task = LMTask()
    model = prepare_model(module, task)
    loaded = rss_now()
    reset()
    out = c.out / "analysis"
    loader = DataLoaderKwargs(collate_fn=collate)
    analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, output_dir=str(out),
                        disable_tqdm=True)
    pool, targets = Rows(c.pool), Rows(c.targets)
    with clock() as factors:
        analyzer.fit_all_factors(factors_name="ekfac", dataset=pool, per_device_batch_size=a.batch_size,
                                 dataloader_kwargs=loader, factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
    with clock() as pairwise:
        analyzer.compute_pairwise_scores(scores_name="targets", factors_name="ekfac", query_dataset=targets,
                                         train_dataset=pool, per_device_query_batch_size=a.batch_size,
                                         per_device_train_batch_size=a.batch_size, dataloader_kwargs=loader,
                                         score_args=ScoreArguments(), overwrite_output_dir=True)
    peak = peak_rss()
    scores = analyzer.load_pairwise_scores("targets")["all_modules"].float()  # (targets, train)
    # Kronfluence's sign: a positive score means training on the example lowers the target loss.
    return {"seconds": factors.seconds + pairwise.seconds, "loaded_rss": loaded, "peak_rss": peak,
            "scores": scores.mean(0).numpy(), "store_bytes": folder_bytes(out), "dim": None,
            "extra_seconds": {"factors (EK-FAC fit on the pool)": factors.seconds,
                              "pairwise scores (pool grads x targets)": pairwise.seconds},
            "notes": f"{len(tracked)} LoRA Linear modules tracked; no projection (full preconditioned "
                     f"gradients); pass = factor fit + pairwise scores (targets included)"}


def run_representation(c: Child) -> dict:
    from ftlab.select.baselines import representation_scores, representation_store
    from ftlab.select.pipeline import groups_of

    base, tok = c.base()
    kw = dict(model_name=c.args.model, batch_size=c.args.batch_size, max_length=c.args.max_length, progress=False)
    loaded = rss_now()
    reset()
    with clock() as feats:
        pool = representation_store(base, tok, c.pool, c.out / "pool", **kw)
    peak = peak_rss()
    tgt = representation_store(base, tok, c.targets, c.out / "target", **kw)
    return {"seconds": feats.seconds, "loaded_rss": loaded, "peak_rss": peak,
            "scores": representation_scores(pool, tgt, groups_of(tgt, c.targets)),
            "store_bytes": folder_bytes(c.out / "pool"), "dim": pool.dim, "notes": "forward only, base model"}


def run_random(c: Child) -> dict:
    from ftlab.select.baselines import random_scores

    return {"seconds": 0.0, "loaded_rss": None, "peak_rss": None, "scores": random_scores(len(c.pool), c.args.seed),
            "store_bytes": 0, "dim": None, "notes": "uniform scores, seeded"}


def reset() -> None:
    from ftlab.memory import reset_peak

    reset_peak()


def child_main(args: argparse.Namespace) -> None:
    """One method in this process: ``<work>/<method>/result.json`` and ``scores.npy``."""
    import numpy as np
    import torch

    work = Path(args.work)
    out = work / args.child
    if out.exists():
        shutil.rmtree(out)  # a half-written store would be resumed and its timing would be wrong
    out.mkdir(parents=True)
    torch.manual_seed(args.seed)
    c = Child(args, work)
    result = {"method": args.child, "threads": torch.get_num_threads(), "python": sys.executable,
              "version": package_version(PEERS[args.child]) if args.child in PEERS else None}
    try:
        got = globals()[f"run_{args.child}"](c)
        np.save(out / "scores.npy", np.asarray(got.pop("scores"), dtype=np.float64))
        result.update(got, status="ok")
    except Exception as e:  # the table says why a peer could not run
        traceback.print_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    write_json(out / "result.json", result)


# ---------------------------------------------------------------- parent

def run_children(args: argparse.Namespace, work: Path, argv: list[str]) -> dict[str, dict]:
    python = args.peers_python if Path(args.peers_python).exists() else sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    methods = args.methods.split(",")
    order = ["ftlab"] + [m for m in methods if m != "ftlab"]  # the others load ftlab's warm-up checkpoint
    for method in order:
        if method not in methods and method != "ftlab":
            continue
        done = work / method / "result.json"
        if not (done.exists() and read_json(done).get("status") == "ok"):
            print(f"== {method} (fresh subprocess)", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([python, __file__, *argv, "--child", method], env=env, cwd=HERE.parent)
            if proc.returncode and not done.exists():
                write_json(done, {"method": method, "status": "failed", "error": f"exit code {proc.returncode}"})
            print(f"   {method}: {time.perf_counter() - t0:.1f} s in all", flush=True)
        results[method] = read_json(done)
    return {m: results[m] for m in methods if m in results}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def bootstrap_ci(values, reps: int, seed: int) -> tuple[float, float]:
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (reps, len(x)))
    means = x[idx].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def per_example_losses(module, tok, examples, max_length: int) -> list[float]:
    import torch

    from ftlab.objectives import target_logprobs
    from ftlab.select.data import collate

    rows = encoded(tok, examples, max_length)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            out += (-target_logprobs(module, collate(rows[i:i + 8], tok.pad_token_id))).tolist()
    return out


def train_on(args, work: Path, name: str, examples, eval_examples) -> list[float]:
    """LoRA on ``examples`` (ftlab's warm-up trainer at 100%, the less_quality recipe), then the
    per-example held-out losses; ``examples=None``: the untrained base."""
    from ftlab.models import load_model
    from ftlab.select.pipeline import SelectConfig, load_lora_model
    from ftlab.select.warmup import WarmupSettings, run_warmup

    base, tok = load_model(args.model, device="cpu")
    if examples is None:
        return per_example_losses(base, tok, eval_examples, args.max_length)
    cfg = SelectConfig(model=args.model, device="cpu", seed=args.seed,
                       lora=lora_settings(args, base.config.num_hidden_layers))
    module, tok = load_lora_model(cfg, base, tok)
    settings = WarmupSettings(percentage=1.0, epochs=args.train_epochs, lr=args.lr, batch_size=4, seed=args.seed)
    out = work / "train" / name
    if out.exists():
        shutil.rmtree(out)
    run_warmup(module, tok, examples, settings, out, max_length=args.max_length)
    return per_example_losses(module, tok, eval_examples, args.max_length)


def without_work(argv: list[str]) -> list[str]:
    """``argv`` less its ``--work X`` / ``--work=X`` (the children get the absolute path)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--work":
            skip = True
        elif not a.startswith("--work="):
            out.append(a)
    return out


def main() -> None:
    argv = [a for a in sys.argv[1:]]
    args = parse(argv)
    sys.path.insert(0, str(SRC))
    if args.child:
        child_main(args)
        return
    import numpy as np

    from ftlab.select.data import load_instructions
    from ftlab.select.scoring import select_top

    work = Path(args.work).absolute()
    args.work = str(work)
    argv = without_work(argv) + ["--work", str(work)]
    before = machine()
    data = prepare_data(args, work)
    results = run_children(args, work, argv)
    pool = load_instructions([work / "data" / "pool.jsonl"])
    ids = [ex.id for ex in pool]
    family = {ex.id: ex.family or ex.task for ex in pool}
    n_tokens = results.get("ftlab", {}).get("n_tokens") or read_json(work / "ftlab" / "result.json")["n_tokens"]

    selection, rows = {}, []
    for m, r in results.items():
        if r.get("status") == "ok":
            scores = np.load(work / m / "scores.npy")
            selection[m] = [ids[i] for i in select_top(scores, ids, fraction=args.fraction)]
        sec = r.get("seconds")
        fast = r.get("status") == "ok" and sec and m != "random"
        mib = lambda b: f"{b / 2**20:.0f}" if b else "-"  # noqa: E731
        rise = (r["peak_rss"] - r["loaded_rss"]) if r.get("peak_rss") and r.get("loaded_rss") else None
        rows.append([m, r.get("version") or "-", GRADS_OF[m], r.get("dim") or "-",
                     f"{sec:.1f}" if fast else "-", f"{len(pool) / sec:.2f}" if fast else "-",
                     f"{n_tokens / sec:.0f}" if fast else "-", mib(r.get("peak_rss")), mib(rise),
                     f"{r['store_bytes'] / 2**20:.2f}" if r.get("store_bytes") else "-",
                     r.get("status") if r.get("status") == "ok" else f"failed: {r.get('error')}"])
    header = ("method", "version", "gradients of", "dim", "pool pass s", "examples/s", "tokens/s",
              "peak RSS MiB", "rise over loaded model MiB", "store MiB", "status")
    overlap = {a: {b: jaccard(set(selection[a]), set(selection[b])) for b in selection} for a in selection}
    composition = {m: sorted({family[i] for i in sel}) for m, sel in selection.items()}

    trained = {}
    if args.train_epochs:
        eval_ex = load_instructions([work / "data" / "eval.jsonl"])
        by_id = {ex.id: ex for ex in pool}
        saved = read_json(work / "train" / "losses.json", {})
        for m in ["base", *selection]:
            key = f"{m}:{args.train_epochs}"
            if key not in saved:
                print(f"== (C) training on the {m} selection", flush=True)
                sel = None if m == "base" else [by_id[i] for i in selection[m]]
                saved[key] = train_on(args, work, m, sel, eval_ex)
                write_json(work / "train" / "losses.json", saved)
            losses = saved[key]
            lo, hi = bootstrap_ci(losses, args.bootstrap, args.seed)
            trained[m] = {"mean_nll": float(np.mean(losses)), "ci95": [lo, hi], "n_eval": len(losses)}
        if "random" in trained:  # paired: the same eval examples, so the difference is far tighter
            rand = np.asarray(saved[f"random:{args.train_epochs}"])
            for m, t in trained.items():
                diff = np.asarray(saved[f"{m}:{args.train_epochs}"]) - rand
                t["minus_random"] = float(diff.mean())
                t["minus_random_ci95"] = list(bootstrap_ci(diff, args.bootstrap, args.seed))

    result = {"args": vars(args), "data": data, "n_tokens": n_tokens, "machine_before": before, "machine": machine(),
              "note": "the machine is shared with other processes (loaded); compare ratios within this run",
              "methods": results, "selection": selection, "jaccard": overlap, "selected_families": composition,
              "trained": trained}
    print(f"\n{args.model}, {len(pool)} pool examples ({n_tokens} tokens, max {args.max_length}), "
          f"{data['n_target']} {args.target_family} targets, d={args.dim}, batch {args.batch_size}, "
          f"LoRA r=8 on q,v of the last {args.lora_layers or 'all'} layers; load before/after "
          f"{before['loadavg'][0]:.2f}/{result['machine']['loadavg'][0]:.2f}\n")
    print(table(rows, header, markdown=True))
    if selection:
        names = list(selection)
        print(f"\nJaccard overlap of the top {args.fraction:.0%} ({len(next(iter(selection.values())))} examples)\n")
        print(table([[a, *[f"{overlap[a][b]:.2f}" for b in names]] for a in names], ["", *names], markdown=True))
        print("\nselected examples' families: " + "; ".join(f"{m}: {', '.join(f)}" for m, f in composition.items()))
    if trained:
        print(f"\n(C) held-out {args.target_family} NLL after {args.train_epochs} LoRA epochs on each selection\n")
        paired = lambda t: (f"{t['minus_random']:+.4f} [{t['minus_random_ci95'][0]:+.4f}, "  # noqa: E731
                            f"{t['minus_random_ci95'][1]:+.4f}]" if "minus_random" in t else "-")
        print(table([[m, f"{t['mean_nll']:.4f}", f"[{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]", paired(t), t["n_eval"]]
                     for m, t in trained.items()],
                    ["trained on", "mean NLL", "bootstrap 95%", "minus random (paired bootstrap 95%)", "eval examples"],
                    markdown=True))
    print(f"wrote {write_json(Path(args.output).absolute(), result)}")


if __name__ == "__main__":
    main()
