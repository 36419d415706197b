"""Shared fixtures: a tiny real tokenizer and tiny models built in memory (fast, offline), and
the real embedded SmolLM2 for tests marked ``slow``."""

from __future__ import annotations

import os

# Tests must never reach the Hugging Face hub; set before transformers reads the variables.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

EOS, PAD = "<|endoftext|>", "<pad>"
# Words the tests use as label words or cues; each must be one token with its leading space.
KEY_WORDS = ["positive", "negative", "neutral", "great", "terrible", "good", "bad", "yes", "no", "maybe",
             "true", "false", "movie", "film", "story", "acting", "plot", "the", "was", "It", "and"]
CORPUS = """\
The movie was great. The film was terrible. It was a great story and the acting was good.
A terrible plot, bad acting and a boring story. I loved every minute of this wonderful movie.
Review: an amazing, beautiful film. Sentiment: positive. Review: a dull, awful mess. Sentiment: negative.
Question: is the sky blue? Answer: yes. Question: is fire cold? Answer: no. Perhaps: maybe.
Premise: a man is sleeping. Hypothesis: a man is awake. Answer: false. Another answer: true or neutral.
What is two plus three? Five. What is the capital of France? Paris. Who wrote it? Nobody knows.
The quick brown fox jumps over the lazy dog while the cat watches from a window in the old house.
She said it was not good at all, but he thought it was fine, and they both laughed about it later.
"""


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Repeating the key words makes BPE merge each " word" into a single token.
    lines = CORPUS.splitlines() + [" ".join(f" {w}" for w in KEY_WORDS)] * 50
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.padding_side = "right"
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~600 tokens) in which every word of ``KEY_WORDS`` is a single
    token after a space (" positive", " yes", ...). Treat it as read-only: it is shared."""
    tok = _train_tokenizer()
    for word in KEY_WORDS:
        assert len(tok(f" {word}", add_special_tokens=False)["input_ids"]) == 1, word
    return tok


# Tiny configs (2 layers, width 64, 4 heads) by architecture; class names are looked up lazily so
# an older transformers without one of them still serves the others.
_TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=512, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=512, word_embed_proj_dim=64)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=512)),
}


def _tiny_config(arch: str, vocab_size: int):
    import transformers

    name, kwargs = _TINY_CONFIGS[arch]
    return getattr(transformers, name)(vocab_size=vocab_size, **kwargs)


@pytest.fixture
def tiny_model_factory(tiny_tokenizer) -> Callable[[str], torch.nn.Module]:
    """``factory(arch="llama")``: a fresh, deterministic (seed 0) fp32 causal LM in eval mode,
    2 layers / hidden 64 / 4 heads, vocabulary = ``tiny_tokenizer``. Archs: llama (2 kv heads),
    gemma3 (one sliding-window layer, window 8), opt, gpt2, gpt_neox."""
    from transformers import AutoModelForCausalLM

    def factory(arch: str = "llama") -> torch.nn.Module:
        config = _tiny_config(arch, len(tiny_tokenizer))
        config.pad_token_id = tiny_tokenizer.pad_token_id
        config.eos_token_id = config.bos_token_id = tiny_tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        return model.float().eval()

    return factory


@pytest.fixture
def base(tmp_path, tiny_model_factory, tiny_tokenizer):
    """A tiny llama and its tokenizer saved as a model folder (what ``model=`` and load_model take)."""
    folder = tmp_path / "base"
    tiny_model_factory("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_model_factory) -> torch.nn.Module:
    """A fresh tiny ``LlamaForCausalLM`` (see ``tiny_model_factory``)."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct and its tokenizer (eval mode, fp32). Shared by
    the session: do not modify it (wrap it, or load your own copy)."""
    from ftlab.models import load_model

    return load_model("smollm2-135m")
