"""The `maxdeeplab` command line: every verb's parser is cheap, and a command's first line comes
before its seconds-long imports (Ray above all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maxdeeplab.cli.main import build_parser

BASE = Path(__file__).resolve().parents[2] / "experiments" / "quickstart" / "train.yaml"
# The command, run with an import hook that stops it where it first imports Ray, saying so.
STOP_AT_RAY = """
import sys

class StopAtRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray":
            print("<importing ray>", flush=True)
            raise ImportError("stopped where Ray is imported")
        return None

sys.meta_path.insert(0, StopAtRay())
from maxdeeplab.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys; from maxdeeplab.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_benchmark_gets_its_own_arguments_once_chosen():
    args = build_parser().parse_args(["bench", "loss", "--batch", "4"])
    assert (args.batch, args.repeats, args.bench_run.__module__) == (
        4,
        5,
        "maxdeeplab.cli.bench.loss",
    )


@pytest.mark.slow
def test_the_first_line_says_what_starts_before_ray_is_imported(tmp_path):
    small = [f"work_dir={tmp_path / 'runs'}", "data.synthetic_train=4", "data.synthetic_val=2"]
    (tmp_path / "sweep.yaml").write_text(
        f"name: study\nbase: {BASE}\noverrides: {{work_dir: {tmp_path / 'runs'}}}\n"
        "search:\n  optim.lr: {grid: [1.0e-3, 2.0e-3]}\n"
    )
    commands = {
        "sweep": (["sweep", "sweep.yaml"], "sweep study: 2 trials over optim.lr"),
        # overrides may follow flags (argparse alone would stop the list at `--name`)
        "train": (
            ["train", str(BASE), "--name", "x", *small],
            "training quickstart: max_deeplab_tiny",
        ),
    }
    for verb, (argv, first) in commands.items():
        done = subprocess.run(
            [sys.executable, "-c", STOP_AT_RAY, *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = done.stdout.splitlines()
        assert lines and lines[0].startswith(first), (verb, done.stdout, done.stderr)
        assert "<importing ray>" in lines, (verb, done.stdout, done.stderr)
