"""router/config.py: a config parses, secrets stay secret, and every problem names its field.

Also ``routerctl check-config`` and ``router --config`` end to end (no network, no Redis).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import router.ctl.cli as ctl
from router.config import Config, config_from_args, load_config, parse_config
from router.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "local.yaml"
CLIENT_SECRET = "client-secret-0123456789"
ADMIN_SECRET = "admin-secret-9876543210"
PROVIDER_SECRET = "provider-secret-abcdef"
ENV = {"CK": CLIENT_SECRET, "ADMIN": ADMIN_SECRET, "PK": PROVIDER_SECRET}
STARS = "**********"

MINIMAL: dict[str, Any] = {
    "client_keys": [{"env": "CK"}],
    "providers": [
        {"name": "a", "kind": "openai", "base_url": "http://127.0.0.1:9101/v1"},
        {"name": "b", "kind": "anthropic", "base_url": "https://b.example"},
    ],
    "routes": [{"model": "m", "targets": [{"provider": "a", "model": "x"}]}],
}

Mutation = Callable[[dict[str, Any]], None]


def minimal() -> dict[str, Any]:
    return copy.deepcopy(MINIMAL)


def problems_of(data: Any, environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, ENV if environ is None else environ)
    return exc.value.problems


def put(*path: str | int, value: Any) -> Mutation:
    """Set ``value`` at ``path`` (creating nothing: the parents must exist)."""

    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


def drop(*path: str | int) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return mutate


def append(*path: str | int, value: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path:
            node = node[part]
        node.append(value)

    return mutate


# --- a valid config --------------------------------------------------------------------


def test_minimal_config_parses_with_defaults() -> None:
    cfg = parse_config(minimal(), ENV)
    assert isinstance(cfg, Config)
    assert [p.name for p in cfg.providers] == ["a", "b"]
    assert cfg.provider("b").kind == "anthropic"
    route = cfg.route("m")
    assert route is not None
    assert (route.strategy, route.max_attempts, route.queue_timeout_s) == ("round_robin", 3, 0)
    assert cfg.route("other") is None
    assert (cfg.redis_url, cfg.admin_token) == (None, None)
    assert (cfg.key_prefix, cfg.pool) == ("rc", "default")
    assert cfg.providers[0].limits.rpm is None


def test_every_secret_resolves_from_the_given_environ() -> None:
    data = minimal()
    data["admin_token"] = {"env": "ADMIN"}
    data["providers"][1]["api_key"] = {"env": "PK"}
    cfg = parse_config(data, ENV)
    assert cfg.client_keys[0].value.get_secret_value() == CLIENT_SECRET
    assert cfg.admin_token is not None
    assert cfg.admin_token.value.get_secret_value() == ADMIN_SECRET
    api_key = cfg.providers[1].api_key
    assert api_key is not None
    assert api_key.value.get_secret_value() == PROVIDER_SECRET


def test_resolved_secrets_never_print() -> None:
    data = minimal()
    data["admin_token"] = {"env": "ADMIN"}
    data["providers"][1]["api_key"] = {"env": "PK"}
    cfg = parse_config(data, ENV)
    assert str(cfg.client_keys[0].value) == STARS
    assert repr(cfg.client_keys[0].value) == f"SecretStr('{STARS}')"
    shown = [repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump())]
    for text in shown:
        for secret in ENV.values():
            assert secret not in text


def test_unresolved_secret_refuses_to_be_read() -> None:
    cfg = parse_config(minimal(), {}, resolve=False)
    ref = cfg.client_keys[0]
    with pytest.raises(RuntimeError, match="secret CK was not resolved"):
        _ = ref.value


@pytest.mark.parametrize(
    ("file_url", "environ", "expected"),
    [
        (None, {}, None),
        (None, {"REDIS_URL": "redis://env:6379/0"}, "redis://env:6379/0"),
        ("redis://file:6379/1", {"REDIS_URL": "redis://env:6379/0"}, "redis://env:6379/0"),
        ("redis://file:6379/1", {}, "redis://file:6379/1"),
        ("redis://file:6379/1", {"REDIS_URL": ""}, "redis://file:6379/1"),
    ],
)
def test_redis_url_from_environ_overrides_the_file(
    file_url: str | None, environ: dict[str, str], expected: str | None
) -> None:
    data = minimal()
    if file_url is not None:
        data["redis_url"] = file_url
    cfg = parse_config(data, {**ENV, **environ})
    assert cfg.redis_url == expected
    assert cfg.client_keys[0].value.get_secret_value() == CLIENT_SECRET  # survives the copy


# --- missing secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, [("client_keys[0]", "environment variable CK is not set")]),
        ({"CK": ""}, [("client_keys[0]", "environment variable CK is not set")]),
        (
            {"OTHER": "x"},
            [
                ("client_keys[0]", "environment variable CK is not set"),
                ("client_keys[1]", "environment variable CK2 is not set"),
                ("admin_token", "environment variable ADMIN is not set"),
                ("providers[1].api_key", "environment variable PK is not set"),
            ],
        ),
    ],
    ids=["unset", "empty", "all-four"],
)
def test_missing_environment_variable_is_a_problem(
    environ: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    data = minimal()
    if len(expected) > 1:
        data["client_keys"].append({"env": "CK2"})
        data["admin_token"] = {"env": "ADMIN"}
        data["providers"][1]["api_key"] = {"env": "PK"}
    assert problems_of(data, environ) == expected


def test_missing_secrets_are_not_checked_when_not_resolving() -> None:
    assert parse_config(minimal(), {}, resolve=False).providers[0].name == "a"


# --- each kind of mistake, with its exact path and message -----------------------------

STRATEGIES = "'round_robin', 'weighted', 'least_connections', 'least_latency' or 'headroom'"


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        pytest.param(
            put("providers", 1, "limits", value={"rpm": 0}),
            ("providers[1].limits.rpm", "must be > 0"),
            id="rpm-zero",
        ),
        pytest.param(
            put("providers", 0, "limits", value={"tpm": -5}),
            ("providers[0].limits.tpm", "must be > 0"),
            id="tpm-negative",
        ),
        pytest.param(
            put("providers", 0, "limits", value={"max_in_flight": 0}),
            ("providers[0].limits.max_in_flight", "must be > 0"),
            id="max-in-flight-zero",
        ),
        pytest.param(
            put("providers", 0, "wieght", value=2),
            ("providers[0].wieght", "unknown field"),
            id="unknown-provider-field",
        ),
        pytest.param(
            put("provders", value=[]),
            ("provders", "unknown field"),
            id="unknown-top-level-field",
        ),
        pytest.param(
            put("routes", 0, "targets", 0, "modle", value="x"),
            ("routes[0].targets[0].modle", "unknown field"),
            id="unknown-target-field",
        ),
        pytest.param(
            put("providers", 0, "limits", value={"burst": 5}),
            ("providers[0].limits.burst", "unknown field"),
            id="unknown-limits-field",
        ),
        pytest.param(
            put("client_keys", value=[{"env": "CK", "value": "plain"}]),
            ("client_keys[0].value", "unknown field"),
            id="plain-secret-refused",
        ),
        pytest.param(
            put("providers", 0, "kind", value="azure"),
            ("providers[0].kind", "must be one of 'openai' or 'anthropic'"),
            id="bad-kind",
        ),
        pytest.param(
            put("routes", 0, "strategy", value="random"),
            ("routes[0].strategy", f"must be one of {STRATEGIES}"),
            id="bad-strategy",
        ),
        pytest.param(
            put("providers", 1, "limits", value={"tpm_accounting": "maybe"}),
            ("providers[1].limits.tpm_accounting", "must be one of 'reserved' or 'actual'"),
            id="bad-tpm-accounting",
        ),
        pytest.param(
            put("providers", 0, "base_url", value="ftp://x.example"),
            ("providers[0].base_url", r"does not match ^https?://[^\s]+$"),
            id="base-url-scheme",
        ),
        pytest.param(
            put("providers", 0, "base_url", value="http://has space"),
            ("providers[0].base_url", r"does not match ^https?://[^\s]+$"),
            id="base-url-space",
        ),
        pytest.param(
            put("providers", 1, "name", value="bad name"),  # b: no route uses it
            ("providers[1].name", "does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
            id="bad-provider-name",
        ),
        pytest.param(
            put("client_keys", value=[{"env": "1BAD"}]),
            ("client_keys[0].env", "does not match ^[A-Za-z_][A-Za-z0-9_]*$"),
            id="bad-env-name",
        ),
        pytest.param(
            put("providers", 1, "name", value="a"),
            ("providers[1].name", "duplicate provider name 'a'"),
            id="duplicate-provider",
        ),
        pytest.param(
            append("routes", value={"model": "m", "targets": [{"provider": "b", "model": "y"}]}),
            ("routes[1].model", "duplicate route model 'm'"),
            id="duplicate-route",
        ),
        pytest.param(
            append("routes", 0, "targets", value={"provider": "nope", "model": "x"}),
            ("routes[0].targets[1].provider", "unknown provider 'nope'"),
            id="unknown-target-provider",
        ),
        pytest.param(
            put("providers", value=[]),
            ("providers", "must have at least 1 item(s)"),
            id="no-providers",
        ),
        pytest.param(
            put("routes", value=[]),
            ("routes", "must have at least 1 item(s)"),
            id="no-routes",
        ),
        pytest.param(
            put("routes", 0, "targets", value=[]),
            ("routes[0].targets", "must have at least 1 item(s)"),
            id="no-targets",
        ),
        pytest.param(
            put("client_keys", value=[]),
            (
                "client_keys",
                "no key can call the API: list client_keys, a tenant's keys, or set an "
                "admin_token (to issue keys at run time)",
            ),
            id="no-client-keys",
        ),
        pytest.param(
            put("routes", 0, "max_attempts", value=0),
            ("routes[0].max_attempts", "must be >= 1"),
            id="max-attempts-zero",
        ),
        pytest.param(
            put("routes", 0, "max_attempts", value=11),
            ("routes[0].max_attempts", "must be <= 10"),
            id="max-attempts-eleven",
        ),
        pytest.param(
            put("routes", 0, "queue_timeout_s", value=-1),
            ("routes[0].queue_timeout_s", "must be >= 0.0"),
            id="negative-queue-timeout",
        ),
        pytest.param(
            put("routes", 0, "queue_timeout_s", value=601),
            ("routes[0].queue_timeout_s", "must be <= 600.0"),
            id="queue-timeout-too-long",
        ),
        pytest.param(
            put("providers", 0, "weight", value=0),
            ("providers[0].weight", "must be >= 1"),
            id="provider-weight-zero",
        ),
        pytest.param(
            put("routes", 0, "targets", 0, "weight", value=1001),
            ("routes[0].targets[0].weight", "must be <= 1000"),
            id="target-weight-too-big",
        ),
        pytest.param(
            put("lease_ttl_s", value=0),
            ("lease_ttl_s", "must be >= 1.0"),
            id="lease-ttl-zero",
        ),
        pytest.param(
            drop("client_keys"),
            ("client_keys", "required field missing"),
            id="missing-client-keys",
        ),
        pytest.param(
            drop("routes", 0, "targets", 0, "model"),
            ("routes[0].targets[0].model", "required field missing"),
            id="missing-target-model",
        ),
        pytest.param(
            put("log", value={"level": "TRACE"}),
            ("log.level", "does not match ^(DEBUG|INFO|WARNING|ERROR)$"),
            id="bad-log-level",
        ),
    ],
)
def test_each_mistake_gives_its_path_and_message(
    mutate: Mutation, problem: tuple[str, str]
) -> None:
    data = minimal()
    mutate(data)
    assert problems_of(data) == [problem]


def test_type_errors_name_the_field_not_the_union_arm() -> None:
    data = minimal()
    data["providers"][0]["limits"] = {"rpm": "many"}
    data["routes"][0]["targets"][0]["weight"] = "heavy"
    paths = [path for path, _ in problems_of(data)]
    assert paths == ["providers[0].limits.rpm", "routes[0].targets[0].weight"]


def test_all_schema_problems_are_reported_together_in_file_order() -> None:
    data = minimal()
    data["tpyo"] = 1
    data["providers"][0]["kind"] = "azure"
    data["providers"][1]["limits"] = {"rpm": 0}
    data["routes"][0]["max_attempts"] = 0
    assert problems_of(data) == [
        ("providers[0].kind", "must be one of 'openai' or 'anthropic'"),
        ("providers[1].limits.rpm", "must be > 0"),
        ("routes[0].max_attempts", "must be >= 1"),
        ("tpyo", "unknown field"),
    ]


def test_cross_field_and_secret_problems_are_reported_together() -> None:
    data = minimal()
    data["providers"][1]["name"] = "a"
    data["routes"][0]["targets"].append({"provider": "ghost", "model": "x"})
    assert problems_of(data, {}) == [
        ("providers[1].name", "duplicate provider name 'a'"),
        ("routes[0].targets[1].provider", "unknown provider 'ghost'"),
        ("client_keys[0]", "environment variable CK is not set"),
    ]


@pytest.mark.parametrize("data", [None, [], ["a"], "text", 3], ids=repr)
def test_non_mapping_is_one_problem_with_empty_path(data: Any) -> None:
    assert problems_of(data) == [("", "the config file must be a YAML mapping")]


def test_config_error_message_joins_the_problems() -> None:
    err = ConfigError([("a.b", "must be > 0"), ("", "whole file")])
    assert str(err) == "a.b: must be > 0\nwhole file"


# --- load_config: files ----------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "router.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_config_reads_a_valid_file(tmp_path: Path) -> None:
    text = """
client_keys: [{env: CK}]
providers:
  - {name: a, kind: openai, base_url: "http://127.0.0.1:9101/v1", limits: {rpm: 10}}
routes:
  - {model: m, strategy: weighted, targets: [{provider: a, model: x}]}
"""
    cfg = load_config(write(tmp_path, text), ENV)
    assert cfg.providers[0].limits.rpm == 10
    assert cfg.routes[0].strategy == "weighted"


def test_load_config_accepts_a_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "client_keys: [{env: CK}]\nproviders: []\nroutes: []\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), ENV)
    assert [p for p, _ in exc.value.problems] == ["providers", "routes"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a: b: c\n", "mapping values are not allowed here at line 1, column 5"),
        ("x: [1\n", "expected ',' or ']', but got '<stream end>' at line 2, column 1"),
        ("a: 1\n\tb: 2\n", "found character '\\t' that cannot start any token at line 2, column 1"),
    ],
    ids=["nested-colon", "unclosed-list", "tab"],
)
def test_yaml_syntax_error_is_one_problem_with_line_and_column(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, ENV)
    assert exc.value.problems == [("", f"{path} is not valid YAML: {reason}")]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- 1\n- 2\n", "just text\n"])
def test_file_that_is_not_a_mapping_is_one_problem(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), ENV)
    assert exc.value.problems == [("", "the config file must be a YAML mapping")]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("missing.yaml", "No such file or directory"), (".", "Is a directory")],
)
def test_unreadable_file_is_one_problem(tmp_path: Path, name: str, reason: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConfigError) as exc:
        load_config(path, ENV)
    assert exc.value.problems == [("", f"cannot read {path}: {reason}")]


def test_file_that_is_not_utf8_is_one_problem(tmp_path: Path) -> None:
    path = write(tmp_path, b'client_keys: [{env: "\xff"}]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, ENV)
    assert exc.value.problems == [("", f"{path} is not UTF-8 text")]


# --- routerctl check-config ------------------------------------------------------------

BAD_FILE = """
client_keys: [{env: ROUTER_CLIENT_KEY}]
providers:
  - {name: a, kind: azure, base_url: "http://a/v1", wieght: 2}
  - {name: b, kind: openai, base_url: "http://b/v1", limits: {rpm: 0}}
routes:
  - {model: m, max_attempts: 0, targets: [{provider: a, model: x}]}
"""
BAD_FILE_PROBLEMS = [
    "providers[0].kind: must be one of 'openai' or 'anthropic'",
    "providers[0].wieght: unknown field",
    "providers[1].limits.rpm: must be > 0",
    "routes[0].max_attempts: must be >= 1",
]


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_CLIENT_KEY", CLIENT_SECRET)
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", ADMIN_SECRET)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("ROUTER_CONFIG", raising=False)


def run_ctl(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exc:
        ctl.main(argv)
    code = exc.value.code
    assert code is None or isinstance(code, int | str)
    return code


@pytest.mark.usefixtures("secrets_env")
def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: ok (3 providers, 3 routes, embedded in-process store)\n"
    assert err == ""
    for secret in (CLIENT_SECRET, ADMIN_SECRET):
        assert secret not in out


@pytest.mark.usefixtures("secrets_env")
def test_check_config_names_the_redis_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    assert run_ctl(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.endswith("3 routes, redis://127.0.0.1:6390/0)\n")


@pytest.mark.usefixtures("secrets_env")
def test_check_config_reports_a_missing_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ROUTER_ADMIN_TOKEN")
    assert run_ctl(["check-config", str(EXAMPLE)]) == 1
    assert capsys.readouterr().out == (
        "admin_token: environment variable ROUTER_ADMIN_TOKEN is not set\n"
    )


@pytest.mark.usefixtures("secrets_env")
def test_check_config_prints_every_problem_one_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_ctl(["check-config", str(write(tmp_path, BAD_FILE))]) == 1
    assert capsys.readouterr().out.splitlines() == BAD_FILE_PROBLEMS


@pytest.mark.usefixtures("secrets_env")
@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: b: c\n", "{path} is not valid YAML: mapping values are not allowed here"),
        ("- 1\n", "the config file must be a YAML mapping"),
    ],
)
def test_check_config_prints_a_whole_file_problem_without_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    path = write(tmp_path, text)
    assert run_ctl(["check-config", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(line.format(path=path))


@pytest.mark.usefixtures("secrets_env")
def test_check_config_reports_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.yaml"
    assert run_ctl(["check-config", str(path)]) == 1
    assert capsys.readouterr().out == f"cannot read {path}: No such file or directory\n"


# --- router --config -------------------------------------------------------------------


def exit_of(path: str | None) -> int | str | None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(path)
    code = exc.value.code
    assert code is None or isinstance(code, int | str)
    return code


@pytest.mark.usefixtures("secrets_env")
def test_router_exits_2_with_every_problem_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BAD_FILE)
    assert exit_of(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: invalid configuration:"
    assert lines[1:] == [f"  {line}" for line in BAD_FILE_PROBLEMS]


@pytest.mark.usefixtures("secrets_env")
def test_router_prints_a_whole_file_problem_without_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[]\n")
    assert exit_of(str(path)) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: invalid configuration:",
        "  the config file must be a YAML mapping",
    ]


@pytest.mark.usefixtures("secrets_env")
def test_router_reads_the_config_named_by_router_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTER_CONFIG", str(EXAMPLE))
    cfg = config_from_args(None)
    assert [r.model for r in cfg.routes] == ["chat-default", "chat-fast", "embed-default"]


@pytest.mark.usefixtures("secrets_env")
def test_router_without_a_config_exits_with_a_message() -> None:
    assert exit_of(None) == "router: no config file: pass --config FILE or set ROUTER_CONFIG"
