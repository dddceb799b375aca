# ruff: noqa: F811 (test_train's module fixtures are imported by name and taken as arguments)
"""Bad input found at the command line or while a stage runs: one line on stderr naming the flag or file and the
value, exit code 2, no usage block, nothing written (issue 20, item 7)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from test_train import _trainer_on_cpu, assets, make_cfg, raises_one_line  # noqa: F401 (module fixtures)

from clipcid_fast.cli import main as cli_main
from clipcid_fast.pipeline import train


def run_cli(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "usage:" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "text, want",
    [
        ("steps: 3\nlr: [1, 2\n", r"not valid YAML at line 3, column 1: did not find expected ',' or '\]'"),
        ("- steps: 3\n- lr: 0.1\n", r"the top level must be a mapping of config keys, got a list"),
        ("steps: [3\n  lr: 1\n", r"not valid YAML at line \d+, column \d+"),
    ],
    ids=["unclosed-list", "top-level-list", "bad-indent"],
)
def test_a_bad_yaml_config_is_one_line(text, want, tmp_path, capsys):
    import re

    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    err = run_cli(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")], capsys)
    assert re.search(rf"--config '{re.escape(str(path))}': {want}", err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--lr", "nan", "> 0"),
        ("--lr", "-1", "> 0"),
        ("--wd", "inf", ">= 0"),
        ("--beta2", "1.0", "in [0, 1)"),
        ("--grad-clip", "nan", ">= 0"),
    ],
)
def test_a_bad_optimiser_number_names_its_flag(flag, value, rule, tmp_path, capsys):
    err = run_cli(["train", flag, value, "--out-dir", str(tmp_path / "run")], capsys)
    assert err == f"clipcid-fast train: error: {flag} must be finite and {rule}, got {float(value)}"
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_corpus_is_refused(assets, tmp_path):
    cfg = dataclasses.replace(make_cfg(assets, tmp_path / "run", "kd"), batch_size=256)  # the corpus has 200 rows
    raises_one_line(ValueError, r"--batch-size 256 is larger than the 200 training rows: a batch would hold the same "
                    r"sample twice", train.run_train, cfg)  # fmt: skip
    cid = dataclasses.replace(make_cfg(assets, tmp_path / "cid", "cid"), batch_size=192)  # cid keeps ~3/4 of them
    raises_one_line(ValueError, r"--batch-size 192 is larger than the \d+ training rows \(the rows cid keeps\)",
                    train.run_train, cid)  # fmt: skip
    assert not os.path.exists(cfg.out_dir) and not os.path.exists(cid.out_dir)
