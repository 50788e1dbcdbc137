"""``routerctl loadtest`` and ``simulate`` check the ``load`` extra before starting anything:
without Locust (or matplotlib) they say what to install, and no cluster is started.

The module is made unimportable, not uninstalled: a ``sitecustomize`` first on
``PYTHONPATH`` puts a finder in front of ``sys.meta_path`` that refuses it, as Python does
for a package that is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, launcher_env, local_config

BLOCKER = """\
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def without(module: str, tmp: Path) -> dict[str, str]:
    """Our environment, where ``import module`` fails as if it were not installed."""
    blocker = tmp / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(module=module))
    runtime = tmp / "run"
    runtime.mkdir(mode=0o700)  # no local cluster of anybody else's to find
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p)
    return launcher_env(PYTHONPATH=path, XDG_RUNTIME_DIR=str(runtime))


@pytest.mark.parametrize(
    ("command", "module", "args"),
    [
        ("loadtest", "locust", ["--duration", "2", "--users", "1"]),
        ("simulate", "matplotlib", ["--strategy", "weighted", "--requests", "1"]),
    ],
)
def test_a_missing_load_extra_is_named_before_anything_starts(
    tmp_path: Path, command: str, module: str, args: list[str]
) -> None:
    env = without(module, tmp_path)
    check = [sys.executable, "-c", f"import {module}"]
    assert subprocess.run(check, env=env, capture_output=True, timeout=60).returncode != 0
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "router.ctl", command, "--config", str(local_config(tmp_path))]
    argv += [*args, "--out", str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"routerctl: {command} needs {module} (the load extra)" in done.stderr
    assert "pip install -e '" in done.stderr
    assert "[load]'" in done.stderr
    assert "starting a local cluster" not in done.stdout
    assert not out.exists() or not any(out.iterdir())  # no cluster log, no results
