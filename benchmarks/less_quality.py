"""LESS quality on the real evals pool: what does LESS select for a target family held out of the pool?

    python benchmarks/less_quality.py                        # CPU-sized defaults (see --help)
    python benchmarks/less_quality.py --device cuda --per-task 40 --lora-layers 0 --max-length 256 --train-epochs 2

Builds the pool with ``ftlab.select.pool.build_evals_pool`` from the registry data of the pinned
``evals`` wheel (the data sets its LICENSE.md restricts left out), holding the ``--families`` out:
they are never in the pool, and per task of theirs the first ``--n-select`` drawn examples define
the target set and the next ``--n-eval`` are the held-out evaluation examples. One warm-up and one
pool-feature pass serve every target (they do not depend on it); then for each target family:
(a) the pool families the selected ``--fraction`` comes from, for LESS, random and
representation similarity, and how much the LESS and representation selections overlap (the
family itself is never in the pool, so what matters is which related tasks are picked, e.g.
other multiple-choice or other-language tasks); (b) with ``--train-epochs N``: LoRA trained on the
LESS / random selection (and ``--full`` the whole pool), scored by the mean response NLL on the
family's held-out examples (beside the untrained base); the selections are saved in the JSON, so a
rerun there (e.g. with ``--transfer-model gemma3-270m`` on another machine) repeats (b) on that
model with SmolLM2's selection without recomputing it.

Resumable: the pool (kept while its spec is unchanged, so a machine without the wheel can run from
a copied ``--work`` folder), warm-up, datastores and finished stages are reused (``--work``).
Writes ``benchmarks/results/less_quality_evals.json`` and prints markdown tables (the earlier
BIG-bench pool's results stay in ``less_quality.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from _common import RESULTS, clock, machine, read_json, table, write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--families", default="exams-qa,lexicon,sarcasm",
                   help="target families, held out of the pool (see ftlab.select.pool.evals_family)")
    p.add_argument("--per-task", type=int, default=2, help="pool examples per registry task")
    p.add_argument("--n-select", type=int, default=2, help="target examples per task of a target family (selection)")
    p.add_argument("--n-eval", type=int, default=2, help="held-out examples per task of a target family (evaluation)")
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-layers", type=int, default=4, help="LoRA on q,v of the last N layers (0: all)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=2, help="warm-up epochs = checkpoints")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--fraction", type=float, default=0.05, help="share of the pool selected")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-epochs", type=int, default=0, help="(b): LoRA epochs on each selection (0: skip)")
    p.add_argument("--full", action="store_true", help="(b): also train on the whole pool")
    p.add_argument("--train-methods", default="less,random,representation",
                   help="(b): selections trained on with --model (the transfer model: less,random)")
    p.add_argument("--full-epochs", type=int, default=None, help="epochs on the whole pool (default: --train-epochs)")
    p.add_argument("--transfer-model", default=None, help="(b) on this model with the selection made by --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/less_quality_evals")
    p.add_argument("--output", default=str(RESULTS / "less_quality_evals.json"),
                   help="results JSON (less_quality.json holds the earlier BIG-bench pool's run)")
    return p.parse_args()


def lora_settings(args: argparse.Namespace, n_layers: int):
    from ftlab.models import LoraSettings

    if args.lora_layers == 0:
        return LoraSettings(r=8, alpha=16)
    layers = range(n_layers - args.lora_layers, n_layers)
    return LoraSettings(r=8, alpha=16, target_modules=[f"layers.{i}.self_attn.{m}" for i in layers
                                                       for m in ("q_proj", "v_proj")])


def pool_files(folder: Path, spec) -> dict[str, Path]:
    """The pool and target files for ``spec``: built from the evals wheel once, then kept while
    the spec is unchanged (the builder's manifest records it; no wheel is needed then)."""
    from ftlab.select.pool import build_evals_pool

    built = build_evals_pool(folder, spec, progress=True)
    counts = built.manifest.get("counts", {})
    if counts:
        print(f"pool from {built.manifest['source']['requirement']}: {counts['tasks_kept']} tasks, licence-excluded "
              f"{', '.join(counts['licence_excluded'])} ({built.seconds:.1f} s)")
    return {"pool": built.pool, **built.targets}


def split_targets(work: Path, paths: dict, args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """Per family: a selection target file and an evaluation file, split per task."""
    from ftlab.select.data import load_instructions

    out = {}
    for family in args.families.split(","):
        rows = collections.defaultdict(list)
        for ex in load_instructions([paths[family]]):
            rows[ex.task].append({"messages": [*ex.messages, {"role": "assistant", "content": ex.response}],
                                  "task": ex.task, "family": ex.family})
        sel, ev = work / "targets" / f"{family}.select.jsonl", work / "targets" / f"{family}.eval.jsonl"
        sel.parent.mkdir(parents=True, exist_ok=True)
        sel.write_text("".join(json.dumps(r) + "\n" for t in sorted(rows) for r in rows[t][:args.n_select]))
        ev.write_text("".join(json.dumps(r) + "\n" for t in sorted(rows) for r in rows[t][args.n_select:]))
        out[family] = (sel, ev)
    return out


def top_families(ids: list[str], rows: list[int], family_of: dict[str, str], n: int = 5) -> dict[str, int]:
    """The ``n`` pool families most selected, with their counts."""
    return dict(collections.Counter(family_of[ids[r]] for r in rows).most_common(n))


def eval_loss(module, tokenizer, examples, max_length: int) -> float:
    """Mean over examples of the mean response-token NLL (no gradients)."""
    import torch

    from ftlab.collate import pad_id
    from ftlab.select.data import collate, encode
    from ftlab.select.warmup import response_loss

    device = next(module.parameters()).device
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            rows = [encode(tokenizer, ex, max_length) for ex in examples[i:i + 8]]
            batch = collate(rows, pad_id(tokenizer)).to(device)
            total += response_loss(module, batch).item() * len(rows)
    return total / len(examples)


def train_and_eval(model_name: str, train_examples, eval_sets: dict, out: Path, args,
                   epochs: int | None = None) -> dict[str, float]:
    """LoRA (via the warm-up trainer, on 100% of ``train_examples``) then held-out losses."""
    from ftlab.models import load_model
    from ftlab.select.pipeline import SelectConfig, load_lora_model
    from ftlab.select.warmup import WarmupSettings, run_warmup

    base, tok = load_model(model_name, device=args.device)
    cfg = SelectConfig(model=model_name, device=args.device, seed=args.seed,
                       lora=lora_settings(args, base.config.num_hidden_layers))
    module, tok = load_lora_model(cfg, base, tok)
    settings = WarmupSettings(percentage=1.0, epochs=epochs or args.train_epochs, lr=args.lr,
                              batch_size=args.batch_size, seed=args.seed)
    run_warmup(module, tok, train_examples, settings, out, max_length=args.max_length, progress=True)
    return {fam: eval_loss(module, tok, exs, args.max_length) for fam, exs in eval_sets.items()}


def select_all(args, work: Path, out: Path, results: dict, pool, pool_path: Path, targets: dict,
               family_of: dict[str, str]) -> None:
    """One warm-up and one pool-feature pass, then per target family the LESS, random and
    representation selections: their ids (``results["selection"]``) and the families they draw."""
    from ftlab.models import load_model
    from ftlab.select.baselines import random_scores, representation_scores, representation_store
    from ftlab.select.data import load_instructions
    from ftlab.select.pipeline import SelectConfig, gradient_features, groups_of, load_lora_model
    from ftlab.select.scoring import less_scores, select_top
    from ftlab.select.warmup import WarmupSettings, run_warmup

    base, tok = load_model(args.model, device=args.device, attn_implementation="eager")
    cfg = SelectConfig(pool=[str(pool_path)], output_dir=str(work / "less"), model=args.model,
                       device=args.device, projection_dim=args.dim, batch_size=args.batch_size,
                       max_length=args.max_length, seed=args.seed,
                       lora=lora_settings(args, base.config.num_hidden_layers),
                       warmup=WarmupSettings(percentage=args.warmup_fraction, epochs=args.epochs, lr=args.lr,
                                             batch_size=max(1, min(args.batch_size, 4)), seed=args.seed))
    # Representations first (forward only), on the model before LoRA is added.
    kw = dict(model_name=args.model, batch_size=args.batch_size, max_length=args.max_length)
    with clock() as rep_clock:
        rep_pool = representation_store(base, tok, pool, work / "rep" / "pool", **kw)

    module, tok = load_lora_model(cfg, base, tok)
    with clock() as warm_clock:
        checkpoints = run_warmup(module, tok, pool, cfg.warmup, work / "less" / "warmup", max_length=args.max_length)
    with clock() as feat_clock:
        train = gradient_features(cfg, module, tok, pool, checkpoints, "adam", "train")
    feat_seconds = feat_clock.seconds
    results["timing_s"] = {"representations": rep_clock.seconds, "warmup": warm_clock.seconds,
                           "pool_features": feat_seconds,
                           "pool_features_per_example_per_checkpoint": feat_seconds / len(pool) / len(checkpoints)}
    ids = train.stores[0].ids
    rand_rows = select_top(random_scores(len(ids), args.seed), ids, fraction=args.fraction)
    for family, (sel, _) in targets.items():
        target_ex = load_instructions([sel])
        tgt = gradient_features(cfg, module, tok, target_ex, checkpoints, "sgd", f"target-{family}")
        less = less_scores(train.stores, tgt.stores, train.lr_weights, groups_of(tgt.stores[0], target_ex))
        with module.disable_adapter():  # the base model's representations
            rep_t = representation_store(module, tok, target_ex, work / "rep" / f"target-{family}", **kw)
        rep = representation_scores(rep_pool, rep_t, groups_of(rep_t, target_ex))
        rep_ids = rep_pool.ids
        less_rows = select_top(less, ids, fraction=args.fraction)
        rep_rows = select_top(rep, rep_ids, fraction=args.fraction)
        results.setdefault("selection", {})[family] = {
            "less": [ids[r] for r in less_rows], "random": [ids[r] for r in rand_rows],
            "representation": [rep_ids[r] for r in rep_rows]}
        less_ids, rep_ids_sel = {ids[r] for r in less_rows}, {rep_ids[r] for r in rep_rows}
        results.setdefault("composition", {})[family] = {
            "held_out": not any(family_of[i] == family for i in ids),
            "less": top_families(ids, less_rows, family_of),
            "random": top_families(ids, rand_rows, family_of),
            "representation": top_families(rep_ids, rep_rows, family_of),
            "less_representation_jaccard": len(less_ids & rep_ids_sel) / max(1, len(less_ids | rep_ids_sel)),
            "n_selected": len(less_rows), "n_targets": len(target_ex),
            "less_n_families": len({family_of[ids[r]] for r in less_rows}),
            "less_selected_families": dict(collections.Counter(family_of[ids[r]] for r in less_rows).most_common()),
        }
        write_json(out, results)


def print_composition(results: dict) -> None:
    fmt = lambda top: ", ".join(f"{f} {n}" for f, n in list(top.items())[:3])  # noqa: E731
    rows = [(fam, fmt(r["less"]), fmt(r["representation"]), fmt(r["random"]), f"{r['less_representation_jaccard']:.2f}",
             r["n_selected"]) for fam, r in results.get("composition", {}).items()]
    print("\n" + table(rows, ("held-out target family", "LESS: top pool families", "representation", "random",
                              "LESS/rep. overlap (Jaccard)", "n selected"), markdown=True))
    print(f"\ntiming (s): {json.dumps(results.get('timing_s'))}")


def train_all(args, work: Path, out: Path, results: dict, pool, targets: dict) -> None:
    """(b): per model, the untrained base, LoRA on each family's selections (``--train-methods``
    for the selecting model, LESS and random for the transfer model) and, with ``--full``, on the
    whole pool; held-out loss on each family's evaluation examples. Finished entries are skipped."""
    from ftlab.models import load_model
    from ftlab.select.data import load_instructions

    by_id = {ex.id: ex for ex in pool}
    eval_sets = {f: load_instructions([e]) for f, (_, e) in targets.items()}
    models = [args.model] + ([args.transfer_model] if args.transfer_model else [])
    for model_name in models:
        res = results.setdefault("train", {}).setdefault(model_name, {})
        if "base" not in res:
            base, tok = load_model(model_name, device=args.device)
            res["base"] = {f: eval_loss(base, tok, exs, args.max_length) for f, exs in eval_sets.items()}
            del base
        methods = args.train_methods.split(",") if model_name == args.model else ("less", "random")
        for family in targets:
            for method in methods:
                key = f"{family}/{method}"
                if key not in res:
                    exs = [by_id[i] for i in results["selection"][family][method]]
                    res[key] = train_and_eval(model_name, exs, {family: eval_sets[family]},
                                              work / "train" / model_name / family / method, args)[family]
                    write_json(out, results)
        if args.full and model_name == args.model and "full" not in res:
            res["full"] = train_and_eval(model_name, pool, eval_sets, work / "train" / model_name / "full", args,
                                         epochs=args.full_epochs)
        write_json(out, results)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [(model_name, family, fmt(res["base"].get(family)),
             *(fmt(res.get(f"{family}/{method}")) for method in ("less", "random", "representation")),
             fmt(res.get("full", {}).get(family)))
            for model_name, res in results["train"].items() for family in targets]
    print("\n" + table(rows, ("model", "target family", "base (no training)", "LESS 5%", "random 5%",
                              "representation 5%", "full pool"), markdown=True))


def main() -> None:
    args = parse()
    from ftlab.select.data import load_instructions
    from ftlab.select.pool import PoolSpec

    work = Path(args.work)
    out = Path(args.output).absolute()
    results = read_json(out, {})
    results["transfer_args" if args.transfer_model else "args"] = vars(args)  # the selecting run keeps its own
    results["transfer_machine" if args.transfer_model else "machine"] = machine()
    paths = pool_files(work / "data", PoolSpec(per_task=args.per_task, n_target=args.n_select + args.n_eval,
                                               max_chars=args.max_chars, seed=args.seed,
                                               target_families=args.families.split(",")))
    pool = load_instructions([paths["pool"]])
    targets = split_targets(work, paths, args)
    family_of = {ex.id: ex.family for ex in pool}
    print(f"pool: {len(pool)} examples, {len(set(family_of.values()))} families; targets: "
          + ", ".join(f"{f} {sum(1 for _ in open(s))}" for f, (s, _) in targets.items()))

    if all(f in results.get("selection", {}) for f in targets):
        print("reusing the selections saved in", out)  # e.g. the transfer run on another machine
    else:
        select_all(args, work, out, results, pool, paths["pool"], targets, family_of)
    print_composition(results)

    if args.train_epochs:
        train_all(args, work, out, results, pool, targets)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
