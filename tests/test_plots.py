import json

import pytest

from ftlab.errors import FtlabError
from ftlab.plots import plot_run


def test_plot_run_writes_a_png(tmp_path):
    lines = [{"step": s, "split": "train", "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 31)]
    lines += [{"step": s, "split": "dev", "accuracy": 0.5 + s / 100, "n": 10} for s in (0, 15, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_run(tmp_path)
    assert out == tmp_path / "training.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_run_needs_a_run_folder(tmp_path):
    with pytest.raises(FtlabError, match="metrics.jsonl not found"):
        plot_run(tmp_path)
