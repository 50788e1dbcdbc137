"""``routerctl check-config`` names every problem in one pass, as the README promises.

Before, a field error stopped the check before the cross-field checks (unknown provider,
duplicate names) and the secrets (unset variables): those showed only once the fields were
fixed, one round trip per kind of problem.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import router.ctl.cli as ctl
from router.config import _raw_secret_refs, _secret_refs, parse_config
from router.errors import ConfigError

BAD: dict[str, Any] = {
    "client_keys": [{"env": "CK"}, {"env": "CK2"}],
    "admin_token": {"env": "ADMIN"},
    "providers": [
        {"name": "a", "kind": "azure", "base_url": "http://a/v1", "api_key": {"env": "PK"}},
        {"name": "b", "kind": "openai", "base_url": "http://b/v1", "limits": {"rpm": 0}},
    ],
    "routes": [
        {"model": "m", "max_attempts": 0, "targets": [{"provider": "ghost", "model": "x"}]},
        {"model": "m", "targets": [{"provider": "b", "model": "y"}]},
    ],
}
FIELDS = [
    ("providers[0].kind", "must be one of 'openai' or 'anthropic'"),
    ("providers[1].limits.rpm", "must be > 0"),
    ("routes[0].max_attempts", "must be >= 1"),
]
CROSS = [
    ("routes[0].targets[0].provider", "unknown provider 'ghost'"),
    ("routes[1].model", "duplicate route model 'm'"),
]
UNSET = [
    ("client_keys[1]", "environment variable CK2 is not set"),
    ("providers[0].api_key", "environment variable PK is not set"),
]
ENV = {"CK": "client-key", "ADMIN": "admin-token"}


def problems_of(data: Any, environ: dict[str, str], resolve: bool = True) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, environ, resolve=resolve)
    return exc.value.problems


def test_field_cross_field_and_secret_problems_come_together() -> None:
    assert problems_of(copy.deepcopy(BAD), ENV) == FIELDS + CROSS + UNSET


def test_without_the_environment_the_others_still_come_together() -> None:
    assert problems_of(copy.deepcopy(BAD), {}, resolve=False) == FIELDS + CROSS


def test_check_config_prints_them_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(BAD), encoding="utf-8")
    for name in ("CK2", "PK", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert ctl.check_config(str(path)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{where}: {what}" for where, what in FIELDS + CROSS + UNSET]
    assert ctl.check_config(str(path), env=False) == 1  # --no-env
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{where}: {what}" for where, what in FIELDS + CROSS]


def test_a_provider_renamed_badly_leaves_its_targets_unknown() -> None:
    data = copy.deepcopy(BAD)
    data["providers"] = [{"name": "bad name", "kind": "openai", "base_url": "http://a/v1"}]
    targets = [{"provider": "a", "model": "x"}, {"provider": "bad name", "model": "x"}]
    data["routes"] = [{"model": "m", "targets": targets}]
    assert problems_of(data, {"CK": "k", "CK2": "k", "ADMIN": "k"}) == [
        ("providers[0].name", "does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
        ("routes[0].targets[0].provider", "unknown provider 'a'"),
    ]


def test_a_malformed_secret_reference_is_not_also_an_unset_variable() -> None:
    data = copy.deepcopy(BAD)
    data["client_keys"] = [{"env": "1BAD"}, {"env": "CK", "value": "plain"}]
    problems = problems_of(data, {"ADMIN": "k", "PK": "k"})
    secrets = [p for p in problems if p[0].startswith("client_keys")]
    assert secrets == [
        ("client_keys[0].env", "does not match ^[A-Za-z_][A-Za-z0-9_]*$"),
        ("client_keys[1].value", "unknown field"),
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"providers": "a"}, {"providers": [1, "a", {"name": 5}, {"name": ["a"]}]},
        {"routes": "m"}, {"routes": [3, {"model": ["m"]}, {"model": ["m"]}]},
        {"routes": [{"model": "m", "targets": "a"}]},
        {"routes": [{"model": "m", "targets": [3, {"provider": ["a"]}, {"provider": None}]}]},
        {"client_keys": "CK"}, {"client_keys": [{"env": 5}, None, "CK"]},
        {"admin_token": "ADMIN"}, {"admin_token": {"env": None}},
        {"providers": [{"name": "a", "api_key": "PK"}, {"name": "b", "api_key": [1]}]},
        {"providers": None, "routes": None, "client_keys": None},
    ],
    ids=repr,
)  # fmt: skip
def test_any_shape_of_yaml_is_a_config_error_not_a_crash(change: dict[str, Any]) -> None:
    data = {**copy.deepcopy(BAD), **change}
    assert problems_of(data, {})


def test_the_raw_and_the_model_secret_lists_agree() -> None:
    data: dict[str, Any] = {
        "client_keys": [{"env": "CK"}, {"env": "CK2"}],
        "admin_token": {"env": "ADMIN"},
        "providers": [
            {"name": "a", "kind": "openai", "base_url": "http://a/v1", "api_key": {"env": "PA"}},
            {"name": "b", "kind": "openai", "base_url": "http://b/v1"},
            {"name": "c", "kind": "anthropic", "base_url": "http://c", "api_key": {"env": "PC"}},
        ],
        "routes": [{"model": "m", "targets": [{"provider": "a", "model": "x"}]}],
    }
    cfg = parse_config(data, {}, resolve=False)
    model = [(path, ref.env) for path, ref in _secret_refs(cfg)]
    assert [(path, ref.env) for path, ref in _raw_secret_refs(data)] == model
    assert len(model) == 5
