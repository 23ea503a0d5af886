"""Numbers and files given on the command line (issue 29): every integer option is range-checked by argparse (exit
2 naming the option, never a traceback), `--out` of `vigild export` and `vigild quantize` is never a file they read
(by name, symlink or hard link), and their output is written beside `--out` and renamed over it, so a symlink at
`--out` is replaced, never written through."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, YOLO_FASTEST, daemon_env, write_video
from test_journal import make_records

from vigild.cli import main
from vigild.outputs.journal import Journal

BIG = str(2**63)
MAX = str(2**63 - 1)


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("journal") / "journal.db"
    writer = Journal(path)
    writer.write(make_records(20))
    writer.close()
    return path


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """argparse's message for `vigild ARGV`, which must exit 2."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--after-seq", BIG, "out of range: expected 0 to 2^63 - 1"),
        ("--track", BIG, "out of range"),
        ("--limit", BIG, "out of range"),
        ("--after-seq", "-1", "out of range"),
        ("--limit", "-1", "out of range"),
        ("--track", "-1", "out of range"),
        ("--limit", "ten", "expected a whole number, got 'ten'"),
    ],
)
def test_events_integers_past_their_range_are_a_usage_error(capsys, journal, option, value, expected):
    err = usage_error(capsys, "events", "--journal", str(journal), option, value)
    assert f"argument {option}: " in err and expected in err, err


def test_the_largest_seq_sqlite_holds_is_taken(capsys, journal):
    assert main(["events", "--journal", str(journal), "--after-seq", MAX]) == 0
    assert main(["events", "--journal", str(journal), "--track", MAX]) == 0
    assert capsys.readouterr().out == ""
    assert main(["events", "--journal", str(journal), "--limit", MAX, "--after-seq", "15"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


@pytest.mark.parametrize(
    "argv",
    [
        ("sub", "--count", "0"),
        ("sub", "--count", BIG),
        ("sub", "--resume", "--after-seq", BIG),
        ("sub", "--resume", "--after-seq", "-2"),
        ("sub", "--timeout", "-1"),
        ("sub", "--timeout", "nan"),
        ("sub", "--timeout", "inf"),
        ("ctl", "--timeout", "0", "status"),
        ("quantize", "--config", "c.yaml", "--camera", "door", "--out", "o.onnx", "--frames", BIG),
        ("quantize", "--config", "c.yaml", "--camera", "door", "--out", "o.onnx", "--holdout", "-1"),
        ("quantize", "--config", "c.yaml", "--camera", "door", "--out", "o.onnx", "--threads", "0"),
        ("quantize", "--config", "c.yaml", "--camera", "door", "--out", "o.onnx", "--threads", BIG),
    ],
    ids=" ".join,
)
def test_every_other_number_option_is_range_checked_too(capsys, argv):
    err = usage_error(capsys, *argv)
    option = next(
        arg for arg in argv if arg in ("--count", "--after-seq", "--timeout", "--frames", "--holdout", "--threads")
    )
    assert f"error: argument {option}" in err, err


def test_a_number_too_large_is_exit_2_with_no_traceback_as_a_user_runs_it(journal):
    done = subprocess.run([sys.executable, "-m", "vigild", "events", "--journal", str(journal), "--after-seq", BIG],
                          env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "vigild events: error: argument --after-seq: " in done.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A copy of the small darknet model, a short video and a config that runs the one on the other."""
    work = tmp_path_factory.mktemp("model")
    for name in ("yolo-fastest-1.1.cfg", "yolo-fastest-1.1.weights", "coco.names"):
        shutil.copy(YOLO_FASTEST / name, work / name)
    video = write_video([np.full((96, 128, 3), 40 * i, np.uint8) for i in range(4)], work / "door.avi", 10)
    (work / "vigild.yaml").write_text(
        f"cameras:\n  door:\n    source: {video}\nplugins:\n  - type: detector\n"
        f"    cfg: {work / 'yolo-fastest-1.1.cfg'}\n    weights: {work / 'yolo-fastest-1.1.weights'}\n"
        f"    names: {work / 'coco.names'}\n"
    )
    return work


HOW = ("same-name", "symlink", "hardlink", "cfg", "names", "config")


@pytest.mark.parametrize(
    ("command", "how"), [*(("export", how) for how in HOW), *(("quantize", how) for how in (*HOW, "camera"))]
)
def test_out_that_is_a_file_the_command_reads_is_refused(model_dir, capsys, tmp_path, command, how):
    target = {"cfg": "yolo-fastest-1.1.cfg", "names": "coco.names", "config": "vigild.yaml", "camera": "door.avi"}
    read = model_dir / target.get(how, "yolo-fastest-1.1.weights")
    out = read
    if how == "symlink":
        out = tmp_path / "model.onnx"
        out.symlink_to(read)
    elif how == "hardlink":
        out = tmp_path / "model.onnx"
        os.link(read, out)
    before = digest(read)
    camera = ["--camera", "door"] if command == "quantize" else []
    code = main([command, "--config", str(model_dir / "vigild.yaml"), *camera, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"vigild {command}: --out {out} is " in err and "which this command reads" in err, err
    assert digest(read) == before


def test_export_replaces_a_symlink_at_out_and_never_writes_through_it(model_dir, capsys, tmp_path):
    import onnx

    victim = tmp_path / "elsewhere" / "precious.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"not a model")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    out.symlink_to(victim)
    assert main(["export", "--config", str(model_dir / "vigild.yaml"), "--out", str(out)]) == 0, capsys.readouterr()
    assert victim.read_bytes() == b"not a model"
    assert not out.is_symlink() and out.is_file()
    meta = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert meta["vigild.resize"] == "stretch"
    assert sorted(path.name for path in out_dir.iterdir()) == ["model.onnx"], "no partial file is left behind"
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_out_that_is_a_directory_is_refused(model_dir, capsys, tmp_path):
    code = main(["export", "--config", str(model_dir / "vigild.yaml"), "--out", str(tmp_path)])
    assert code == 2 and "is a directory" in capsys.readouterr().err


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_check_names_the_replay_socket_the_daemon_binds_by_default(tmp_path, monkeypatch, capsys):
    """Without XDG_RUNTIME_DIR the replay socket is in the config's own state directory (vigild.paths), not the
    publisher's port + 1; a `journal.replay_endpoint` of the config is printed as it is."""
    from vigild import paths

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "cams#2.yaml"
    config.write_text("cameras:\n  a:\n    source: test://balls\nplugins: []\n")
    assert main(["check", "--config", str(config)]) == 0
    expected = paths.replay_endpoint(config)
    assert expected.startswith(f"ipc://{tmp_path}/.local/state/vigild/") and expected.endswith("/run/replay")
    assert f"(replay on {expected})" in capsys.readouterr().out
    config.write_text(config.read_text() + "journal:\n  replay_endpoint: tcp://127.0.0.1:7001\n")
    assert main(["check", "--config", str(config)]) == 0
    assert "(replay on tcp://127.0.0.1:7001)" in capsys.readouterr().out
