"""Every script in benchmarks/ runs on the code as it is: each once with `--tiny`, all at once (one BLAS
thread each, each in its own temp folder and session), must exit 0 and end stdout with one JSON line holding
exactly the keys its docstring lists.

Each runs as `python SCRIPT --tiny` would (argv, `__main__`, sys.path[0], cwd, TMPDIR, stdout and stderr
files, exit code), in a process forked from one interpreter that has imported what the scripts import (torch,
transformers, vldistill ...) and nothing else: the ~5 s of imports a fresh interpreter pays are paid once, not
once per script.

The convention a benchmark script follows (new ones are picked up by the glob):
  - `--tiny` runs it on tiny data / steps in seconds;
  - its module docstring lists the JSON keys in its first `{"key", "key", ...}` block;
  - only that JSON line goes to stdout (everything else to stderr).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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


# The forking interpreter: argv[1] is a JSON list of [script, folder]. It imports every module the scripts
# import at top level (a failing import is left for the script to report), then forks one child per script,
# which becomes `python SCRIPT --tiny` run in FOLDER, and writes each child's pid to FOLDER/pid and, once it is
# reaped, its exit code (negative: killed by that signal) to FOLDER/exit.
FORKER = """
import ast, importlib, json, os, runpy, sys, tempfile
runs = json.loads(sys.argv[1])
sys.path[0] = os.path.dirname(runs[0][0])  # the benchmarks folder, as for `python SCRIPT`; _harness is there
for script, _ in runs:
    for node in ast.parse(open(script).read()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        else:
            continue
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:
                pass
sys.stdout.flush(), sys.stderr.flush()  # nothing of the forker's output goes to a child's files
children = {}
for script, folder in runs:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.chdir(folder)
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = None  # found again from TMPDIR
        for fd, name in ((1, "stdout"), (2, "stderr")):
            opened = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = [script, "--tiny"]
        runpy.run_path(script, run_name="__main__")  # an exception or SystemExit ends this process as it would
        sys.exit(0)
    children[pid] = folder
    with open(os.path.join(folder, "pid"), "w") as record:
        record.write(str(pid))
while children:
    pid, status = os.wait()
    folder = children.pop(pid)
    with open(os.path.join(folder, "exit.part"), "w") as record:
        record.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(os.path.join(folder, "exit.part"), os.path.join(folder, "exit"))
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every benchmark started at once with --tiny: (script name -> its folder holding stdout, stderr, pid and exit;
    the forking process; its own folder; the deadline)."""
    folders = {script.name: tmp_path_factory.mktemp(script.stem) for script in BENCHMARKS}
    log = tmp_path_factory.mktemp("forker")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = json.dumps([[str(script), str(folders[script.name])] for script in BENCHMARKS])
    with open(log / "stdout", "w") as stdout, open(log / "stderr", "w") as stderr:
        forker = subprocess.Popen([sys.executable, "-c", FORKER, runs], cwd=log, env=env, stdout=stdout, stderr=stderr,
                                  start_new_session=True)
    yield folders, forker, log, time.monotonic() + TIMEOUT
    for folder in folders.values():
        if (folder / "pid").exists() and not (folder / "exit").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int((folder / "pid").read_text()), 9)  # the script and anything it started
    with contextlib.suppress(ProcessLookupError):
        os.killpg(forker.pid, 9)
    forker.wait()


def exit_code(folder: Path, forker: subprocess.Popen, log: Path, deadline: float) -> Optional[int]:
    """The exit code of the script run in `folder`, waiting until `deadline` (None: still running then); failing
    with the forker's stderr (in `log`) when it died first."""
    while not (folder / "exit").exists():
        if time.monotonic() > deadline:
            return None
        if forker.poll() is not None and not (folder / "exit").exists():
            pytest.fail(f"the forking interpreter exited {forker.returncode} before {folder.name} finished:\n"
                        f"{(log / 'stderr').read_text()[-3000:]}")
        time.sleep(0.2)
    return int((folder / "exit").read_text())


def test_the_known_benchmarks_are_found():
    assert {"cache_speedup.py", "data_scale.py", "scale_out.py"} <= {script.name for script in BENCHMARKS}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda script: script.name)
def test_benchmark_runs_tiny_and_prints_its_json(script, launched):
    folders, forker, log, deadline = launched
    folder = folders[script.name]
    code = exit_code(folder, forker, log, deadline)
    if code is None:
        pytest.fail(f"{script.name} --tiny still running after {TIMEOUT} s")
    out, err = (folder / "stdout").read_text(), (folder / "stderr").read_text()
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
