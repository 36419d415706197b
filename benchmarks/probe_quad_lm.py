"""Quad vs cross-entropy language modelling (Saunshi, Malladi, Arora 2021, the Quad objective),
through ftlab's one training loop (``objective=quad`` vs ``objective=loss``).

A small Llama (width --hidden, --layers blocks, tied embeddings; a byte-level BPE tokenizer of
--vocab tokens trained on the LM training sentences, so that the output layer, which dominates a
small LM's cost on a CPU, stays small: 1.3M parameters at the defaults) is trained from scratch on
the texts of the four sentiment corpora (:data:`CORPUS_TASKS`: movie-review, tweet, Amazon and NYT
snippets, about 23,000 after de-duplication, minus those of the sentiment probe's dev and test
splits), with the same initialisation, batches, steps and tokens for both objectives, per seed.
(Results before the move off BIG-bench used multiemo's ``all_sentence_en``, 56,000 sentences.)
Then, per model: held-out LM loss (cross-entropy of softmax(z), the Quad loss, and for Quad the
cross-entropy of its own estimate p ~ clip(z, 1e-6) renormalised) and linear-probe accuracy of
f(s) and Phi p_f(s) on the sentiment task.

    python benchmarks/probe_quad_lm.py --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ftlab import objectives  # noqa: E402
from ftlab.config import TrainConfig, load_config  # noqa: E402
from ftlab.models import load_model  # noqa: E402
from ftlab.objectives import Encoder  # noqa: E402
from ftlab.probe.cache import split_features  # noqa: E402
from ftlab.probe.features import FeatureSpec  # noqa: E402
from ftlab.probe.probes import fit_probe  # noqa: E402
from ftlab.rundir import RunDir  # noqa: E402
from ftlab.tasks import load_task, make_splits  # noqa: E402
from ftlab.tasks.base import Example, TaskSpec  # noqa: E402
from ftlab.tasks.splits import Splits  # noqa: E402
from ftlab.train import RunData, train  # noqa: E402

from _common import machine, table, write_json  # noqa: E402

LM = TaskSpec(name="reviews-lm", template="{start}", metric="f1",
              description="language modelling: each sentence's first word is the prompt, the rest the target")
CORPUS_TASKS = ("sentiment", "sentiment_tweets", "sentiment_amazon", "sentiment_nyt")


def corpus(exclude: set[str], max_words: int, n_heldout: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out) LM examples from the texts of :data:`CORPUS_TASKS` not in ``exclude``
    (each cut to ``max_words`` words; texts of fewer than 3 words and repeats skipped)."""
    seen, rows = set(), []
    for task in CORPUS_TASKS:
        for ex in load_task(task)[1]:
            text = " ".join(ex.fields["text"].split()[:max_words])
            if len(text.split()) < 3 or text in seen or text in exclude:
                continue
            seen.add(text)
            first, rest = text.split(" ", 1)
            rows.append(Example(id=f"lm:{ex.id}", fields={"start": first}, answers=(rest,), source=ex.source))
    random.Random(seed).shuffle(rows)
    return rows[n_heldout:], rows[:n_heldout]


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts`` (EOS doubles as padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def fresh_model(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


@torch.no_grad()
def heldout(model, tokenizer, texts: list[Example], batch_size: int = 32) -> dict[str, float]:
    """Per-sentence mean over target tokens, then mean over sentences (as the training losses reduce)."""
    enc = Encoder(tokenizer, LM, max_length=128)
    ce, quad, ce_z = [], [], []
    for i in range(0, len(texts), batch_size):
        exs = texts[i:i + batch_size]
        batch = enc.generation([LM.prompt(e) for e in exs], [LM.target(e) for e in exs])
        span = batch.labels.shape[1]
        z = objectives._last_logits(model, batch, span + 1)[:, :-1].double()
        valid, labels = batch.labels != -100, batch.labels.clamp(min=0)
        per_row = lambda v, valid=valid: ((v * valid).sum(-1) / valid.sum(-1)).tolist()  # noqa: E731
        ce += per_row(-torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0])
        quad += per_row(-z.gather(-1, labels[..., None])[..., 0] + 0.5 * z.pow(2).sum(-1))
        p = z.clamp(min=1e-6)
        ce_z += per_row(-(p.gather(-1, labels[..., None])[..., 0] / p.sum(-1)).log())
    return {"ce": float(np.mean(ce)), "quad": float(np.mean(quad)), "ce_of_clipped_z": float(np.mean(ce_z))}


def probe(model, tokenizer, splits: Splits, spec: TaskSpec, seed: int) -> dict[str, float]:
    fspec = FeatureSpec(("f", "phi_p"))
    feats = {name: split_features(model, tokenizer, spec, getattr(splits, name), name, fspec, max_length=128)
             for name in ("train", "dev", "test")}
    y = {name: np.array([e.label for e in getattr(splits, name)]) for name in ("train", "dev", "test")}
    return {kind: fit_probe(feats["train"][kind], y["train"], feats["test"][kind], y["test"],
                            feats["dev"][kind], y["dev"], seed=seed).accuracy for kind in fspec.kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--n-heldout", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--probe-train", type=int, default=200)
    ap.add_argument("--probe-test", type=int, default=200)
    ap.add_argument("--runs", default="runs/probe-quad-lm")
    ap.add_argument("--out", default="probe_quad_lm.json")
    args = ap.parse_args()

    start_state = machine()
    spec, examples = load_task("sentiment")
    psplits = make_splits(examples, seed=0, n_train=args.probe_train, n_dev=50, n_test=args.probe_test)
    held_texts = {e.fields["text"] for e in psplits.dev + psplits.test}
    lm_train, lm_held = corpus(held_texts, args.max_words, args.n_heldout, seed=0)
    tokenizer = train_tokenizer([f"{e.fields['start']} {e.answers[0]}" for e in lm_train], args.vocab)
    rows = []
    for seed in args.seeds:
        init = fresh_model(tokenizer, args.hidden, args.layers, seed)
        n_params = sum(p.numel() for p in init.parameters())
        for objective in ("loss", "quad"):
            out = Path(args.runs) / f"{objective}-h{args.hidden}-l{args.layers}-v{args.vocab}-seed{seed}"
            cfg = load_config(TrainConfig, None, [
                f"model=scratch-llama-h{args.hidden}-l{args.layers}-v{args.vocab}", f"objective={objective}",
                "optimizer=adamw", f"lr={args.lr}",
                f"steps={args.steps}", f"batch_size={args.batch_size}", "schedule=cosine", "warmup_steps=20",
                "eval_every=0", f"checkpoint_every={max(1, args.steps // 3)}", f"seed={seed}",
                "data.max_length=128", f"output_dir={out}"])
            model = fresh_model(tokenizer, args.hidden, args.layers, seed)  # the same init for both objectives
            t0 = time.perf_counter()
            train(cfg, progress=False, model_and_tokenizer=(model, tokenizer),
                  data=RunData(LM, Splits(train=lm_train, dev=[], test=[])))
            seconds = time.perf_counter() - t0
            run = RunDir(out)
            trained, _ = load_model(str(run.model))  # also right after a resumed / finished run
            losses = [r["loss"] for r in run.read_metrics(split="train")]
            row = {"seed": seed, "objective": "cross-entropy" if objective == "loss" else "quad",
                   "params": n_params, "steps": args.steps, "sentences": args.steps * args.batch_size,
                   "train_loss_last20": float(np.mean(losses[-20:])), "train_seconds": round(seconds, 1),
                   "heldout": heldout(trained, tokenizer, lm_held),
                   "probe": probe(trained, tokenizer, psplits, spec, seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ["seed", "objective", "held-out CE (nats/token)", "held-out Quad", "Quad model: CE of clip(z)",
              "probe f(s)", "probe Phi p_f(s)", "train s"]
    print(table([[r["seed"], r["objective"], r["heldout"]["ce"], r["heldout"]["quad"], r["heldout"]["ce_of_clipped_z"],
                  r["probe"]["f"], r["probe"]["phi_p"], r["train_seconds"]] for r in rows], header))
    path = write_json(args.out, {"args": vars(args), "corpus": {"source": f"ftlab tasks {', '.join(CORPUS_TASKS)}",
                                                                "tokens_per_sentence": float(np.mean(
                                                                    [len(tokenizer(f"{e.fields['start']} "
                                                                                   f"{e.answers[0]}")["input_ids"])
                                                                     for e in lm_train[:2000]])),
                                                                "train_sentences": len(lm_train),
                                                                "heldout_sentences": len(lm_held)},
                                 "probe_splits": {"train": len(psplits.train), "dev": len(psplits.dev),
                                                  "test": len(psplits.test)},
                                 "rows": rows, "machine_start": start_state, "machine_end": machine()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
