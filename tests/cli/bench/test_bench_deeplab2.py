"""`bench deeplab2` runs the reference as an argument list: a path is never shell text."""

from __future__ import annotations

import argparse
import stat

from maxdeeplab.cli.bench.deeplab2 import SCRIPT, _time_deeplab2

FAKE_PYTHON = """#!/bin/sh
here=$(dirname "$0")
printf '%s\\n' "$@" > "$here/args.txt"
printf '%s\\n' "$PYTHONPATH" > "$here/pythonpath.txt"
echo '{"train_step_s": 1.5}'
"""


def test_reference_env_path_is_one_argument_never_shell_text(tmp_path, monkeypatch):
    # The old `bash -c 'source "<env>/activate.sh" ...'` ran the $(...) in this name.
    env = tmp_path / 'env "$(touch pwned)" x'
    python = env / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(env=str(env), crop=65, batch=1, steps=2, threads=1)
    assert _time_deeplab2(args) == 1.5
    assert not (tmp_path / "pwned").exists()
    passed = (python.parent / "args.txt").read_text().splitlines()
    assert passed == [str(SCRIPT), "--crop", "65", "--batch", "1", "--steps", "2", "--threads", "1"]
    assert (python.parent / "pythonpath.txt").read_text().strip().split(":")[0] == str(env / "src")
