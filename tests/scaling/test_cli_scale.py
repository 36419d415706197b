"""`ftlab scale` prints the rule's hyperparameters; bad input is an FtlabError (exit code 2 in `ftlab`)."""

from typer.testing import CliRunner

from ftlab.cli.study import scale_app
from ftlab.errors import FtlabError


def test_scale_prints_new_hyperparameters_and_the_rule():
    result = CliRunner().invoke(scale_app, ["--kappa", "4", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[2:] if line.strip()}
    assert rows["batch_size"] == ["4", "16"] and rows["lr"] == ["0.001", "0.002"]
    assert rows["eps"] == ["1e-08", "5e-09"] and "[0.6, 0.996]" in result.output
    assert "square root rule" in result.output


def test_scale_sgd_and_mezo():
    out = CliRunner().invoke(scale_app, ["--kappa", "2", "--optimizer", "sgd", "--momentum", "0.9"]).output
    assert "0.002" in out and "momentum" in out and "linear" in out
    out = CliRunner().invoke(scale_app, ["--kappa", "2", "--optimizer", "mezo", "--n-perturbations", "1"]).output
    assert "n_perturbations" in out and "ZO-SGD" in out


def test_scale_bad_input_is_an_ftlab_error():
    for args in (["--kappa", "0"], ["--kappa", "16", "--optimizer", "adam"], [ "--kappa", "2", "--betas", "x"]):
        result = CliRunner().invoke(scale_app, args)
        assert isinstance(result.exception, FtlabError), args


def test_experiment_commands_refuse_bad_input_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(scale_app, ["momentum", "train.optimizer=adamw", f"output_dir={tmp_path / 'm'}"])
    assert isinstance(result.exception, FtlabError) and "set train.optimizer=sgd" in str(result.exception)
    result = CliRunner().invoke(scale_app, ["local-sgd", "alpha=0.5", "train.optimizer=sgd",
                                            f"output_dir={tmp_path / 'l'}"])
    assert isinstance(result.exception, FtlabError) and "launch it with torchrun" in str(result.exception)
    result = CliRunner().invoke(scale_app, ["local-sgd", "period=0", "alpha=0.5", f"output_dir={tmp_path / 'l'}"])
    assert isinstance(result.exception, FtlabError) and "local_sgd.period: must be >= 1" in str(result.exception)
