"""Constants that must agree across modules (one copy is kept apart so that --help stays fast)."""
import importlib.util
import os

import effort
from conftest import ROOT


def test_cli_default_effort_is_the_library_default():
    spec = importlib.util.spec_from_file_location("qae_cli", os.path.join(ROOT, "test.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.DEFAULT_EFFORT == effort.DEFAULT


def test_cli_default_weights_are_the_library_default():
    import checkpoint

    spec = importlib.util.spec_from_file_location("qae_cli", os.path.join(ROOT, "test.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.DEFAULT_WEIGHTS == checkpoint.DEFAULT_WEIGHTS and os.path.exists(cli.DEFAULT_WEIGHTS)
