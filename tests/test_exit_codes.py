"""The three commands end with the same exit code for the same kind of failure (``splitwire.exit_codes``).

One test per code, each through the commands' own ``main``: a fixable failure is one line and
``FAILED``, a bad command line argparse's ``USAGE``, an unreachable cloud ``TRY_AGAIN``, an
interrupt ``INTERRUPTED``, and an exception splitft did not raise on purpose keeps its traceback.
"""

from __future__ import annotations

import socket

import pytest

from bundles import export_cached, tiny_options
from cloud_backend.cli import main as cloud_main
from edge_runtime.cli import main as edge_main
from exporter.cli import main as export_main
from splitwire.errors import ConnectionLost, ServerBusy, SplitftError
from splitwire.exit_codes import FAILED, INTERRUPTED, OK, TRY_AGAIN, USAGE, exit_code


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_command_exits_failed_with_one_line_for_a_missing_bundle_or_model(tmp_path, capsys):
    missing = tmp_path / "missing"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("keep")
    runs = {
        "sft-edge eval": lambda: edge_main(["eval", "--bundle", str(missing), "--cloud", "ws://127.0.0.1:1",
                                            "--eval-file", str(tmp_path / "e.tsv")]),
        "sft-cloud": lambda: cloud_main(["--bundle", str(missing)]),
        "sft-export": lambda: export_main(["--model", str(tmp_path), "--split", "1", "--out", str(tmp_path / "out")]),
    }
    for prog, run in runs.items():
        assert run() == FAILED, prog
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_every_command_exits_usage_for_a_bad_command_line_and_its_help_lists_the_codes(capsys):
    for run in (lambda: edge_main(["train"]), lambda: cloud_main([]), lambda: export_main(["--split", "0"])):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == USAGE
        assert "usage:" in capsys.readouterr().err
    for main, argv in ((edge_main, ["--help"]), (edge_main, ["eval", "--help"]), (cloud_main, ["--help"]),
                       (export_main, ["--help"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == OK
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"exit status: {OK} done; {FAILED} failed" in help_text and f"{TRY_AGAIN} the cloud" in help_text


def test_an_unreachable_cloud_exits_try_again(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(4)))
    url = f"ws://127.0.0.1:{_closed_port()}"
    code = edge_main(["train", "--bundle", str(tiny_bundle), "--cloud", url, "--data", str(data),
                      "--checkpoint-dir", str(tmp_path / "runs"), "--reconnect-for", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == TRY_AGAIN, err
    assert err.startswith("sft-edge train: error: ") and "Traceback" not in err


def _raise(exc: BaseException):
    def command() -> None:
        raise exc
    return command


def test_the_exit_code_follows_the_error_class_and_bugs_keep_their_traceback(capsys):
    assert exit_code("cmd", lambda: None) == OK
    assert exit_code("cmd", _raise(SplitftError("no"))) == FAILED
    assert exit_code("cmd", _raise(FileNotFoundError(2, "No such file", "x.tsv"))) == FAILED
    assert exit_code("cmd", _raise(ConnectionLost("gone"))) == TRY_AGAIN
    assert exit_code("cmd", _raise(ServerBusy("full"))) == TRY_AGAIN
    assert exit_code("cmd", _raise(KeyboardInterrupt()), interrupted="stopped; rerun") == INTERRUPTED
    assert capsys.readouterr().err.splitlines() == [
        "cmd: error: no", "cmd: error: [Errno 2] No such file: 'x.tsv'", "cmd: error: gone", "cmd: error: full",
        "cmd: stopped; rerun"]
    for bug in (ValueError("a bug"), KeyError("a bug"), TypeError("a bug")):
        with pytest.raises(type(bug)):
            exit_code("cmd", _raise(bug))
