"""The command line as a user meets it: real subprocesses, JSON on stdout, one-line errors."""

import json
import subprocess
import sys

import pytest

from edgeweave.cli.common import normalize_json_flag


def ew(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    r = ew("--help")
    assert r.returncode == 0
    for cmd in ("train", "demo"):
        assert cmd in r.stdout


def test_every_subcommand_has_help():
    import typer.main
    from typer.testing import CliRunner

    from edgeweave.cli import app

    def walk(group, path):
        for name, cmd in getattr(group, "commands", {}).items():
            yield path + [name]
            yield from walk(cmd, path + [name])

    paths = list(walk(typer.main.get_command(app), []))
    assert len(paths) >= 2
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "Usage" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--model", "no_such_model", "--dataset", "synthetic"], "unknown model"),
        (["train", "--model", "small_cnn", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--model", "small_cnn", "--dataset", "cifar100", "--root", "/nonexistent"], "cifar-100-python"),
        (["train", "--model", "/nonexistent/model.safetensors", "--dataset", "synthetic"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    r = ew(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_train_synthetic_json(tmp_path):
    r = ew("train", "--model", "cifar_resnet18", "--dataset", "synthetic", "--input-size", "8", "--epochs", "1",
           "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"accuracy", "epochs", "seconds"}
    assert out["epochs"] == 1 and 0.0 <= out["accuracy"] <= 1.0
    assert (tmp_path / "best.safetensors").is_file()
    # --json PATH writes the file instead of stdout
    r2 = ew("train", "--model", str(tmp_path / "best.safetensors"), "--dataset", "synthetic", "--input-size", "8",
            "--epochs", "1", "--out", str(tmp_path / "again"), "--json", str(tmp_path / "s.json"))
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.strip() == ""
    assert json.loads((tmp_path / "s.json").read_text())["epochs"] == 1


def test_normalize_json_flag():
    assert normalize_json_flag(["run", "--json"]) == ["run", "--json", "-"]
    assert normalize_json_flag(["run", "--json", "--check"]) == ["run", "--json", "-", "--check"]
    assert normalize_json_flag(["run", "--json", "out.json"]) == ["run", "--json", "out.json"]
    assert normalize_json_flag(["run", "--json", "-"]) == ["run", "--json", "-"]
