"""Every script in benchmarks/ runs on the code as it is: each once with `--tiny`, in a fresh process
(all started together, one BLAS thread each, in a temp folder), must exit 0 and end stdout with one JSON
line holding exactly the keys its docstring lists.

The convention a benchmark script follows (new ones are picked up by the glob):
  - `--tiny` runs it on tiny data / steps in seconds;
  - its module docstring lists the JSON keys in its first `{"key", "key", ...}` block;
  - only that JSON line goes to stdout (everything else to stderr).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("[!_]*.py"))  # _*.py: shared code
TIMEOUT = 300  # seconds for every benchmark together; scale_out.py's own --tiny deadline is 240 s
pytestmark = pytest.mark.slow  # every benchmark script runs in a fresh process


def documented_keys(script: Path, printed: dict) -> set[str]:
    """The JSON keys the script's docstring lists in its first {"key", ...} block (failing, with the keys
    it `printed`, when there is none)."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    block = re.search(r"\{[^{}]*\}", doc)
    keys = set(re.findall(r'"([^"]+)"', block.group(0))) if block else set()
    listing = "{" + ", ".join(f'"{key}"' for key in printed) + "}"
    assert keys, f"{script.name}: its docstring lists no JSON keys; it printed {listing}"
    return keys


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every benchmark started at once with --tiny: script name -> (process, stdout file, stderr file)."""
    runs = {}
    for script in BENCHMARKS:
        folder = tmp_path_factory.mktemp(script.stem)
        stdout, stderr = (open(folder / name, "w+") for name in ("stdout", "stderr"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(folder)}
        process = subprocess.Popen(
            [sys.executable, str(script), "--tiny"], cwd=folder, env=env, stdout=stdout, stderr=stderr,
            start_new_session=True,
        )
        runs[script.name] = (process, stdout, stderr)
    yield runs, time.monotonic() + TIMEOUT
    for process, stdout, stderr in runs.values():
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
        stdout.close()
        stderr.close()


def test_the_known_benchmarks_are_found():
    assert {"cache_speedup.py", "data_scale.py", "scale_out.py"} <= {script.name for script in BENCHMARKS}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda script: script.name)
def test_benchmark_runs_tiny_and_prints_its_json(script, launched):
    runs, deadline = launched
    process, stdout, stderr = runs[script.name]
    try:
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} --tiny still running after {TIMEOUT} s")
    stdout.seek(0), stderr.seek(0)
    out, err = stdout.read(), stderr.read()
    assert code == 0, f"{script.name} --tiny exited {code}:\n{err[-3000:]}"
    lines = out.strip().splitlines()
    assert lines, f"{script.name} --tiny printed nothing to stdout"
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict), f"{script.name} --tiny printed {type(figures).__name__}, not a JSON object"
    assert set(figures) == documented_keys(script, printed=figures)


def test_scale_out_deadline_kills_a_run_and_fails(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_out", [s for s in BENCHMARKS if s.name == "scale_out.py"][0])
    scale_out = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_out)
    marker = tmp_path / "child-pid"
    sleeper = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(SystemExit, match="deadline passed: killed"):
        scale_out.run([sys.executable, "-c", sleeper], {}, scale_out.Deadline(2.0))
    assert time.monotonic() - start < 10
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert scale_out.Deadline(None).remaining() == float("inf")
