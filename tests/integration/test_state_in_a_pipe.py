"""``routerctl state | less``: through a pipe, 80 columns, every figure whole, and a pointer
to ``--json`` on stderr (the table is for people; scripts should not parse it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from router.state.keys import Keys
from tests.helpers import ENV, Mock, write_config

KEYS = Keys("rc", "default")
LONG = "azure-openai-eastus2-gpt-4o-prod"
LIMITS = {"rpm": 20000, "tpm": 2000000, "max_in_flight": 1024}


def routerctl_state(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, "COLUMNS": "80"}
    argv = [sys.executable, "-m", "router.ctl", "state", "--config", str(config), *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


def test_state_through_a_pipe_fits_80_columns_and_points_at_json(
    tmp_path: Path, redis_url: str
) -> None:
    mocks = [Mock(LONG, weight=500, limits=LIMITS), Mock("anthropic-claude-3-5-sonnet-backup")]
    routes = [{"model": "gpt-4o-mini-2024-07-18-with-a-long-alias", "strategy": "weighted",
               "targets": [{"provider": m.name, "model": "m"} for m in mocks]}]  # fmt: skip
    config = write_config(tmp_path / "router.yaml", redis_url, mocks, routes)
    client = redis.Redis.from_url(redis_url)
    now_s = int(client.time()[0])
    client.hset(KEYS.provider(LONG), mapping={f"r:{now_s}": 12345, f"t:{now_s}": 1987654})
    client.close()

    done = routerctl_state(config)
    print(done.stdout)
    assert "…" not in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    for figure in ("12345/20000", "1987654/2000000", "0/1024", "500"):
        assert figure in done.stdout, figure
    assert done.stderr.count("\n") == 1
    assert "routerctl state --json" in done.stderr

    assert routerctl_state(config, "--json").stderr == ""
