"""``routerctl``: operate a cluster from the command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from router.config import (
    Config,
    Strategy,
    load_config,
    masked_url,
    print_problems,
    secret_variables,
)
from router.ctl.local import ClusterRecord, Registry
from router.ctl.tables import render_keys, render_state, render_usage
from router.ctl.tenants import add_arguments as add_tenant_arguments
from router.ctl.tenants import run as run_tenants
from router.ctl.up import DEFAULT_CONFIG, REPO_ROOT
from router.ctl.up import add_arguments as add_up_arguments
from router.ctl.up import up as run_up
from router.errors import BadRequest, ConfigError, StoreError
from router.state.cluster import ClusterState, describe_keys, read_state, state_json
from router.state.health import HealthStore
from router.state.store import Store
from router.state.usage import UsageQuery, read_usage, usage_json, usage_query


def check_config(path: str, *, env: bool = True) -> int:
    """Validate ``path``; print every problem with its field path. Exit status 0 or 1.

    Without ``env`` (``--no-env``: a CI pipeline has no production secrets) the environment
    is not read at all: the file alone is checked, and the output names the variables that
    must be set where the config runs. With it, a missing variable is a problem."""
    try:
        cfg = load_config(path, None if env else {}, resolve=env)
    except ConfigError as exc:
        for field, message in exc.problems:
            print(f"{field}: {message}" if field else message)
        return 1
    store = masked_url(cfg.redis_url) if cfg.redis_url else "embedded in-process store"
    print(f"{path}: ok ({len(cfg.providers)} providers, {len(cfg.routes)} routes, {store})")
    if not env:
        names = ", ".join(secret_variables(cfg))
        print(
            f"environment not checked (--no-env): {names} must be set where it runs; "
            "REDIS_URL, if set there, replaces redis_url"
        )
    return 0


def _fail(text: str) -> None:
    print(f"routerctl: {text}", file=sys.stderr)


def _unresolved_config(path: str) -> Config | None:
    """``path`` with its secrets left unresolved: client keys, the admin token and provider
    keys are the replicas' business, not that of a command reading or changing the shared
    state. ``REDIS_URL`` still replaces ``redis_url``."""
    try:
        return load_config(path, resolve=False)
    except ConfigError as exc:
        print_problems(exc, f"routerctl: {path}: invalid configuration:")
        return None


def _recorded_config(record: ClusterRecord, cfg: Config | None = None) -> Config | None:
    """The config of a local cluster of ``routerctl up``, on the Redis it runs on."""
    if cfg is None:
        cfg = _unresolved_config(record.config)
        if cfg is None:
            return None
    if record.redis_url is None:
        _fail(
            f"{record.describe()} keeps its state inside its one replica, not in a Redis: "
            "install redis-server and start it again"
        )
        return None
    print(f"routerctl: {record.describe()}", file=sys.stderr)
    return cfg.model_copy(update={"redis_url": record.redis_url})


def _named_config(path: str) -> Config | None:
    """``--config``'s file; with no Redis named there or in REDIS_URL, the Redis of the
    local cluster that runs this very file."""
    cfg = _unresolved_config(path)
    if cfg is None or cfg.redis_url:
        return cfg
    mine = str(Path(path).resolve())
    same = [r for r in Registry.for_user(os.environ).running() if r.config == mine]
    if len(same) == 1:
        return _recorded_config(same[0], cfg)
    _fail("the config names no Redis (redis_url or REDIS_URL), and the cluster state lives there")
    return None


def _no_cluster(records: list[ClusterRecord]) -> str:
    if not records:
        return (
            "no config file: pass --config FILE or set ROUTER_CONFIG (and no local "
            "cluster of `routerctl up` is running)"
        )
    ports = ", ".join(f"port {r.port} ({r.config})" for r in records)
    return f"several local clusters are running ({ports}): pass --config FILE"


def _shared_state_config(path: str | None) -> Config | None:
    """The config of the cluster whose shared state ``state``, ``keys``, ``drain`` and
    ``enable`` read or change: ``--config`` (or ROUTER_CONFIG), else the one local cluster
    ``routerctl up`` runs. ``None`` once the reason is printed."""
    if path:
        return _named_config(path)
    if os.environ.get("REDIS_URL"):
        _fail(
            "no config file: pass --config FILE or set ROUTER_CONFIG (REDIS_URL is set: "
            "unset it to use a local cluster of `routerctl up`)"
        )
        return None
    records = Registry.for_user(os.environ).running()
    if len(records) != 1:
        _fail(_no_cluster(records))
        return None
    return _recorded_config(records[0])


async def _set_drain(cfg: Config, provider: str, drained: bool) -> int:
    store = Store.from_config(cfg)
    try:
        await store.start()
        return await HealthStore(store).set_drain(provider, drained)
    finally:
        await store.close()


def drain(path: str | None, provider: str, drained: bool) -> int:
    """Drain (or enable) ``provider`` for every replica. Exit status 0, 1 or 2."""
    cfg = _shared_state_config(path)
    if cfg is None:
        return 2
    if provider not in {p.name for p in cfg.providers}:
        print(f"routerctl: no provider named {provider!r} in the config", file=sys.stderr)
        return 2
    try:
        version = asyncio.run(_set_drain(cfg, provider, drained))
    except StoreError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    verb = "drained" if drained else "enabled"
    print(f"{provider}: {verb} for every replica (health version {version})")
    return 0


async def _show_state(store: Store, cfg: Config, as_json: bool, watch: float | None) -> None:
    state = await read_state(store, cfg)
    if not as_json and not Console().is_terminal:  # a pipe or a log: a script may be reading
        print(
            "routerctl: this table is for people; scripts read the JSON form: "
            "routerctl state --json",
            file=sys.stderr,
        )
    if watch is None and as_json:
        print(json.dumps(state_json(state), indent=2))
    elif watch is None:
        Console().print(render_state(state, cfg.redis_url))
    elif as_json:
        await _watch_json(store, cfg, state, watch)
    else:
        await _watch_table(store, cfg, state, watch)


async def _watch_json(store: Store, cfg: Config, state: ClusterState, every: float) -> None:
    """One JSON document per line, per refresh, until Ctrl-C."""
    while True:
        print(json.dumps(state_json(state)), flush=True)
        await asyncio.sleep(every)
        try:
            state = await read_state(store, cfg)
        except StoreError as exc:  # keep watching: Redis may come back
            print(f"routerctl: {exc} (retrying)", file=sys.stderr, flush=True)


async def _watch_table(store: Store, cfg: Config, state: ClusterState, every: float) -> None:
    """The tables, refreshed in place until Ctrl-C."""
    with Live(render_state(state, cfg.redis_url), auto_refresh=False) as live:
        while True:
            await asyncio.sleep(every)
            try:
                table = render_state(await read_state(store, cfg), cfg.redis_url)
                live.update(table, refresh=True)
            except StoreError as exc:  # keep watching: Redis may come back
                live.update(Text(f"routerctl: {exc} (retrying)", style="red"), refresh=True)


async def _inspect(cfg: Config, command: str, as_json: bool, watch: float | None) -> None:
    store = Store.from_config(cfg)
    try:
        await store.start(warm=1)
        if command == "keys":
            Console().print(render_keys(await describe_keys(store, cfg)))
        else:
            await _show_state(store, cfg, as_json, watch)
    finally:
        await store.close()


def inspect_cluster(
    path: str | None, command: str, as_json: bool = False, watch: float | None = None
) -> int:
    """Show the cluster state (``state``) or its Redis keys (``keys``). Exit status 0, 1 or 2."""
    cfg = _shared_state_config(path)
    if cfg is None:
        return 2
    try:
        asyncio.run(_inspect(cfg, command, as_json, watch))
    except StoreError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the way out of --watch
        return 0
    return 0


async def _read_usage(cfg: Config, q: UsageQuery, as_json: bool) -> None:
    store = Store.from_config(cfg)
    try:
        await store.start(warm=1)
        report = await read_usage(store, q.period, q.label, q.tenant)
    finally:
        await store.close()
    if as_json:
        print(json.dumps(usage_json(report), indent=2))
    else:
        Console().print(render_usage(report))


def show_usage(
    path: str | None, period: str, at: str | None, tenant: str | None, as_json: bool = False
) -> int:
    """Show one day's or month's usage per tenant, route and provider, read from Redis.
    Exit status 0, 1 (Redis failed) or 2 (a wrong argument, no cluster)."""
    try:
        q = usage_query(period, at, tenant)
    except BadRequest as exc:
        print(f"routerctl usage: --{exc.param}: {exc}", file=sys.stderr)
        return 2
    cfg = _shared_state_config(path)
    if cfg is None:
        return 2
    try:
        asyncio.run(_read_usage(cfg, q, as_json))
    except StoreError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    return 0


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _add_inspect_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    state = sub.add_parser("state", help="show the cluster's shared state: providers, replicas")
    state.add_argument("--config", default=os.environ.get("ROUTER_CONFIG"))
    state.add_argument("--json", action="store_true", help="print the JSON form (schema 1)")
    state.add_argument("--watch", type=_seconds, metavar="SECONDS", help="refresh until Ctrl-C")
    keys = sub.add_parser("keys", help="list the deployment's Redis keys: type, TTL, meaning")
    keys.add_argument("--config", default=os.environ.get("ROUTER_CONFIG"))
    usage = sub.add_parser(
        "usage", help="show usage per tenant, route and provider: requests, tokens, cost"
    )
    usage.add_argument("--config", default=os.environ.get("ROUTER_CONFIG"))
    usage.add_argument("--tenant", help="only this tenant")
    usage.add_argument(
        "--period",
        choices=("day", "month"),
        default="day",
        help="a UTC day or month (default: day)",
    )
    usage.add_argument(
        "--at", metavar="LABEL", help="which one: YYYY-MM-DD or YYYY-MM (default: the current)"
    )
    usage.add_argument("--json", action="store_true", help="print the JSON form (schema 1)")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_cluster_options(cmd: argparse.ArgumentParser, config: str, what: str) -> None:
    """Options shared by ``simulate`` and ``loadtest``: the config, the cluster, the output."""
    cmd.add_argument(
        "--config",
        help=f"router config (default: {config}; a local cluster of `routerctl up` "
        "running it is used, not started again)",
    )
    cmd.set_defaults(default_config=config)
    cmd.add_argument(
        "--host",
        help="a running cluster's URL (http://H:P); default: the local cluster of routerctl up "
        "running the config, else start one (the config's mock providers, a private "
        "redis-server) and stop it at the end",
    )
    cmd.add_argument(
        "--replicas",
        type=_at_least_one,
        default=2,
        help="replicas of the cluster started without --host (default: 2)",
    )
    cmd.add_argument(
        "--out", default="loadtest/results", help=f"{what} (default: loadtest/results)"
    )


def _add_load_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser(
        "simulate", help="drive chat requests through a route; check its strategy's split"
    )
    _add_cluster_options(
        sim, str(REPO_ROOT / "examples" / "simulate.yaml"), "where the JSON and PNG go"
    )
    sim.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="drive the first route using it (default: the --route's own; without --host, "
        "with --route, a different one replaces the route's in a copy of the config)",
    )
    sim.add_argument("--requests", type=_at_least_one, default=300, help="(default: 300)")
    sim.add_argument("--concurrency", type=_at_least_one, default=8, help="(default: 8)")
    sim.add_argument(
        "--route",
        metavar="MODEL",
        help="the route to drive (default: the first using --strategy)",
    )
    sim.add_argument(
        "--redis-url",
        help="the cluster's Redis, to sample its state (default: REDIS_URL, "
        "the config's, or the started cluster's)",
    )
    sim.add_argument("--max-tokens", type=_at_least_one, default=16, help="(default: 16)")
    load = sub.add_parser("loadtest", help="a headless Locust run, then the providers' counts")
    _add_cluster_options(load, str(DEFAULT_CONFIG), "where Locust's CSV and HTML go")
    load.add_argument("--users", type=_at_least_one, default=20, help="(default: 20)")
    load.add_argument("--spawn-rate", type=_seconds, default=5.0, help="users/s (default: 5)")
    load.add_argument("--duration", type=_at_least_one, default=60, help="seconds (default: 60)")


LOAD_MODULES = {"loadtest": ("locust",), "simulate": ("matplotlib",)}
"""What each load command needs from the ``load`` extra, checked before it starts anything."""


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _install_load_extra() -> str:
    """The command that installs the ``load`` extra into the Python running us."""
    if not (REPO_ROOT / "pyproject.toml").exists():  # installed from a wheel
        return f"{sys.executable} -m pip install 'router-cluster[load]'"
    if Path(sys.prefix).resolve() == (REPO_ROOT / ".venv").resolve():
        return f"cd {REPO_ROOT} && .venv/bin/pip install -e '.[load]'"
    return f"{sys.executable} -m pip install -e '{REPO_ROOT}[load]'"


def _load_target(args: argparse.Namespace) -> None:
    """Point ``loadtest``/``simulate`` without ``--host`` at the local cluster that runs the
    config they would start (another would find its mock ports taken); ``loadtest`` without
    ``--config`` at the one local cluster that is up, whatever its config."""
    explicit = args.config is not None
    args.config = args.config or args.default_config
    if args.host:
        return
    records = Registry.for_user(os.environ).running()
    mine = [r for r in records if r.config == str(Path(args.config).resolve())]
    if not mine and not explicit and args.command == "loadtest" and len(records) == 1:
        mine = records
    if len(mine) != 1:
        return  # none: the command starts its own
    record = mine[0]
    args.config, args.host = record.config, record.endpoint
    if args.command == "simulate":
        args.redis_url = args.redis_url or os.environ.get("REDIS_URL") or record.redis_url
    if record.client_key:  # generated by that launcher: nobody has it in the environment
        try:
            name = load_config(record.config, resolve=False).client_keys[0].env
        except ConfigError:
            name = ""  # the command reports the config's problems itself
        if name and not os.environ.get(name):
            os.environ[name] = record.client_key  # read there by the command and by Locust
    print(f"routerctl {args.command}: {record.describe()}", flush=True)


def _run_load(args: argparse.Namespace) -> int:
    """``simulate`` or ``loadtest``: their code (matplotlib, Locust) is imported only here."""
    missing = _missing(LOAD_MODULES[args.command])
    if missing:
        _fail(
            f"{args.command} needs {', '.join(missing)} (the load extra), which is not "
            f"installed: {_install_load_extra()}"
        )
        return 2
    _load_target(args)
    if args.command == "simulate":
        from loadtest.simulate import simulate

        return simulate(args)
    from loadtest.loadrun import loadtest

    return loadtest(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``routerctl`` command."""
    parser = argparse.ArgumentParser(prog="routerctl", description="Operate a router cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="check the file alone: do not read the environment (secrets, REDIS_URL), e.g. "
        "in a CI pipeline without the production secrets",
    )
    up = sub.add_parser(
        "up", help="run a local cluster: mock providers, Redis and replicas, until Ctrl-C"
    )
    add_up_arguments(up)
    for name, text in (("drain", "stop sending traffic to"), ("enable", "send traffic again to")):
        cmd = sub.add_parser(name, help=f"{text} a provider, on every replica")
        cmd.add_argument("provider")
        cmd.add_argument("--config", default=os.environ.get("ROUTER_CONFIG"))
    _add_inspect_commands(sub)
    add_tenant_arguments(sub)
    _add_load_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("tenants", "tenant"):
        sys.exit(run_tenants(args))
    if args.command in ("simulate", "loadtest"):
        sys.exit(_run_load(args))
    if args.command in ("state", "keys"):
        watch = getattr(args, "watch", None)
        sys.exit(inspect_cluster(args.config, args.command, getattr(args, "json", False), watch))
    if args.command == "usage":
        sys.exit(show_usage(args.config, args.period, args.at, args.tenant, args.json))
    if args.command in ("drain", "enable"):
        sys.exit(drain(args.config, args.provider, args.command == "drain"))
    if args.command == "check-config":
        sys.exit(check_config(args.file, env=not args.no_env))
    if args.command == "up":
        sys.exit(run_up(args))


if __name__ == "__main__":
    main()
