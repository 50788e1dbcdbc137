"""``log.decisions``: ``OFF`` as people write it. YAML reads an unquoted ``OFF`` as false,
which the config used to refuse ("Input should be a valid string")."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.config import load_config
from router.errors import ConfigError
from router.telemetry.logs import decision_log, decisions_logged, setup_logging

CONFIG = """
client_keys: [{{env: CK}}]
log: {{decisions: {value}}}
providers: [{{name: a, kind: openai, base_url: "http://127.0.0.1:9/v1"}}]
routes: [{{model: m, targets: [{{provider: a, model: x}}]}}]
"""


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    decision_log.disabled = False
    decision_log.setLevel(logging.NOTSET)


def decisions(tmp_path: Path, value: str) -> str:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(value=value), encoding="utf-8")
    return load_config(path, {"CK": "client-key"}).log.decisions


@pytest.mark.parametrize(
    ("written", "read", "logged"),
    [
        ("OFF", "OFF", False), ("off", "OFF", False), ("Off", "OFF", False),
        ("'OFF'", "OFF", False), ('"off"', "OFF", False), ("false", "OFF", False),
        ("'false'", "OFF", False), ("no", "OFF", False),
        ("INFO", "INFO", True), ("info", "INFO", True), ("debug", "DEBUG", True),
        ("true", "INFO", True), ("on", "INFO", True), ("Warning", "WARNING", False),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("restore_logging")
def test_off_in_any_spelling_turns_the_decision_log_off(
    tmp_path: Path, written: str, read: str, logged: bool
) -> None:
    assert decisions(tmp_path, written) == read
    cfg = load_config(tmp_path / "router.yaml", {"CK": "client-key"})
    setup_logging(cfg.log)
    assert decisions_logged() is logged


@pytest.mark.usefixtures("restore_logging")
def test_a_second_setup_turns_the_log_back_on(tmp_path: Path) -> None:
    decisions(tmp_path, "OFF")
    setup_logging(load_config(tmp_path / "router.yaml", {"CK": "k"}).log)
    assert not decisions_logged()
    decisions(tmp_path, "INFO")
    setup_logging(load_config(tmp_path / "router.yaml", {"CK": "k"}).log)
    assert decisions_logged()


@pytest.mark.parametrize("written", ["TRACE", "verbose", "0", "[]"])
def test_other_values_are_refused_with_the_field_path(tmp_path: Path, written: str) -> None:
    with pytest.raises(ConfigError) as exc:
        decisions(tmp_path, written)
    assert [path for path, _ in exc.value.problems] == ["log.decisions"]
