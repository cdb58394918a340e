"""Coverage-guided fuzzing in CI: every target of tools/fuzz.py runs for a short fixed time, and every input
that once crashed a target is replayed against its fix."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

FUZZ = os.path.join(ROOT, "tools", "fuzz.py")
SECONDS = 20  # per target; the long runs' figures are in docs/robustness.md
CRASHES = sorted(glob.glob(os.path.join(ROOT, "tests", "fuzz", "crashes", "*")))


@pytest.mark.parametrize("target", ["decode", "container", "images"])
def test_fuzz_target_runs_clean(target, tmp_path):
    """libFuzzer finds no crash, hang or memory blow-up within SECONDS, starting from the committed corpus."""
    corpus = os.path.join(ROOT, "tests", "fuzz", "corpus", target)
    run = subprocess.run([sys.executable, FUZZ, target, f"-max_total_time={SECONDS}", "-timeout=30",
                          f"-artifact_prefix={tmp_path}/", str(tmp_path), corpus],
                         capture_output=True, text=True, timeout=SECONDS + 240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DONE" in run.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("crash-", "oom-", "timeout-", "leak-"))]


@pytest.mark.parametrize("path", CRASHES, ids=[os.path.basename(p) for p in CRASHES])
def test_crash_inputs_stay_fixed(path):
    """A once-crashing input (named TARGET-…) now meets its target's contract."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import fuzz

    with open(path, "rb") as f:
        fuzz.target(os.path.basename(path).split("-")[0])(f.read())
