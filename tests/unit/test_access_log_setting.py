"""``log.access`` takes the spellings an operator writes in YAML; the start-up settings of
``redis`` have their bounds."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from router.config import parse_config
from router.errors import ConfigError

BASE: dict[str, Any] = {
    "client_keys": [{"env": "K"}],
    "providers": [{"name": "a", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}],
    "routes": [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}],
}


def config(text: str) -> Any:
    return parse_config({**BASE, **yaml.safe_load(text)}, {"K": "k"})


@pytest.mark.parametrize(
    ("written", "level"),
    [("OFF", "OFF"), ("off", "OFF"), ("false", "OFF"), ("'off'", "OFF"), ("true", "INFO"),
     ("debug", "DEBUG"), ("INFO", "INFO"), ("warning", "WARNING")],
)  # fmt: skip
def test_access_levels_as_yaml_spells_them(written: str, level: str) -> None:
    assert config(f"log: {{access: {written}}}").log.access == level


def test_the_defaults() -> None:
    cfg = config("{}")
    assert (cfg.log.access, cfg.api_docs) == ("INFO", False)
    assert (cfg.redis.startup_timeout_s, cfg.redis.start_degraded) == (5.0, False)


@pytest.mark.parametrize(
    ("written", "field"),
    [("log: {access: loud}", "log.access"), ("redis: {startup_timeout_s: -1}",
     "redis.startup_timeout_s"), ("redis: {startup_timeout_s: 601}", "redis.startup_timeout_s")],
)  # fmt: skip
def test_bad_values_are_reported_with_their_field(written: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(written)
    assert [path for path, _ in caught.value.problems] == [field]
