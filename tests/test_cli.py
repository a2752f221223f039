"""The `koa` CLI: help for every command, and synth -> roi -> prepare through the real entry point."""

import subprocess
import sys

import pandas as pd
import pytest

from koa_ray.cli import build_parser, main

COMMANDS = ["synth", "prepare", "roi", "train", "evaluate", "score", "gradcam", "tune", "export", "demo"]


def test_every_command_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: koa " + cmd in capsys.readouterr().out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "koa_ray.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "prepare" in r.stdout


def test_synth_roi_prepare_via_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "bi"), "--n", "3", "--layout", "bilateral", "--seed", "4"]) == 0
    (tmp_path / "bi" / "images" / "zz_bad.png").write_bytes(b"nope")
    assert main(["roi", str(tmp_path / "bi" / "images"), "--out", str(tmp_path / "boxes.csv")]) == 0
    boxes = pd.read_csv(tmp_path / "boxes.csv")
    assert list(boxes.columns) == ["path", "x0", "y0", "x1", "y1", "side", "score", "roi_fallback", "implant"]
    assert not boxes["implant"].any()
    assert len(boxes) == 6 and sorted(boxes["side"]) == ["L"] * 3 + ["R"] * 3
    assert ((boxes.x1 - boxes.x0) == (boxes.y1 - boxes.y0)).all()
    errors = pd.read_csv(tmp_path / "boxes.errors.csv")
    assert errors["path"].str.endswith("zz_bad.png").tolist() == [True]
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "s"), "--n", "20", "--size", "64"]) == 0
    assert main(["prepare", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--image-size", "48", "--local"]) == 0
    assert "prepared 20 files" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--image-size", "48", "--local"]) == 0
    assert "reused existing output" in capsys.readouterr().out


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "p"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", "r.csv"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
