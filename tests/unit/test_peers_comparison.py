"""``python -m loadtest.bench --peers``: the peers' configs, their installs' errors and the
comparison table (no network, no process: installers are stand-ins, figures made up)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from loadtest import bench, peers

PORTS = [41001, 41002, 41003]


def test_litellm_routes_one_model_over_the_three_upstreams_with_redis() -> None:
    cfg = peers.litellm_config(PORTS, 6390, "sk-key", "usage")
    models = cfg["model_list"]
    assert {m["model_name"] for m in models} == {peers.MODEL}
    assert [m["litellm_params"]["api_base"] for m in models] == [
        f"http://127.0.0.1:{p}/v1" for p in PORTS
    ]
    assert {m["litellm_params"]["model"] for m in models} == {"openai/gpt-4o-mini"}
    assert len({m["model_info"]["id"] for m in models}) == 3
    rs = cfg["router_settings"]
    assert rs["routing_strategy"] == "usage-based-routing-v2"
    assert (rs["redis_host"], rs["redis_port"]) == ("127.0.0.1", 6390)
    assert cfg["general_settings"]["master_key"] == "sk-key"
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_litellm_can_shuffle_instead() -> None:
    cfg = peers.litellm_config(PORTS, 6390, "sk-key", "shuffle")
    assert cfg["router_settings"]["routing_strategy"] == "simple-shuffle"
    with pytest.raises(KeyError):
        peers.litellm_config(PORTS, 6390, "sk-key", "fastest")


def test_portkey_balances_over_the_three_upstreams_equally() -> None:
    cfg = peers.portkey_config(PORTS)
    assert cfg["strategy"] == {"mode": "loadbalance"}
    assert [t["custom_host"] for t in cfg["targets"]] == [f"http://127.0.0.1:{p}/v1" for p in PORTS]
    assert {t["provider"] for t in cfg["targets"]} == {"openai"}
    assert {t["weight"] for t in cfg["targets"]} == {1}


def test_the_peer_config_header_goes_into_the_wrk_script(tmp_path: Path) -> None:
    header = orjson.dumps(peers.portkey_config(PORTS)).decode()
    path = bench.wrk_script(tmp_path, "bench-model", "sk-x", {"x-portkey-config": header}, "pk")
    text = path.read_text()
    assert path.name == "wrk-pk.lua"
    assert f"wrk.headers['x-portkey-config'] = '{header}'" in text
    assert 'wrk.headers["Authorization"] = "Bearer sk-x"' in text
    assert '"model":"bench-model"' in text


def test_a_header_lua_cannot_quote_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quotable"):
        bench.wrk_script(tmp_path, "m", headers={"x": "it's"})


def test_the_options_for_the_quick_comparison() -> None:
    opts = bench.parse_args(["--peers-only", "--quick"])
    assert (opts.peers, opts.peers_only, opts.duration) == (True, True, 3.0)
    full = bench.parse_args(["--peers"])
    assert (full.peers, full.peers_only, full.duration) == (True, False, 10.0)
    assert not bench.parse_args([]).peers


# ---------------------------------------------------------------------------- installs


def _fake(rc: int, out: str = "") -> tuple[list[list[str]], peers.Runner]:
    calls: list[list[str]] = []

    def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc, out, "")

    return calls, run


def test_a_failed_pip_names_litellm_and_why(tmp_path: Path) -> None:
    calls, run = _fake(1, "WARNING: x is ignored: it is neither a file\nERROR: ConnectionError: "
                          "Max retries exceeded")  # fmt: skip
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.install_litellm(tmp_path, run)
    assert e.value.peer == "LiteLLM"
    assert "could not be installed" in str(e.value)
    assert "unreachable" in e.value.reason
    assert "ConnectionError" in e.value.reason
    assert "is ignored" not in e.value.reason
    assert calls[0][-3:] == ["-m", "venv", str(tmp_path / "litellm-venv")]


def test_a_pip_that_finds_no_release_says_so(tmp_path: Path) -> None:
    _, run = _fake(1, "ERROR: Could not find a version that satisfies the requirement "
                      "litellm[proxy]==1.105.7 (from versions: none)")  # fmt: skip
    with pytest.raises(peers.PeerUnavailable, match="no release found"):
        peers.install_litellm(tmp_path, run)


def test_an_installed_litellm_of_the_pin_is_reused(tmp_path: Path) -> None:
    exe = tmp_path / "litellm-venv" / "bin" / "litellm"
    exe.parent.mkdir(parents=True)
    exe.touch()
    marker = tmp_path / "litellm-venv" / ".router-cluster-installed"
    marker.write_text(peers.LITELLM_SPEC + "\n")
    calls, run = _fake(0)
    assert peers.install_litellm(tmp_path, run) == exe
    assert calls == []
    marker.write_text("litellm[proxy]==0.0.1\n")  # another pin: installed again
    peers.install_litellm(tmp_path, run)
    assert calls[-1][-1] == peers.LITELLM_SPEC


def test_a_failed_npm_names_portkey_and_why(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(peers.shutil, "which", lambda name: f"/usr/bin/{name}")
    calls, run = _fake(1, "npm error code ENOTFOUND\nnpm error network request failed")
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.install_portkey(tmp_path, run)
    assert e.value.peer == "Portkey"
    assert "unreachable" in e.value.reason
    assert "ENOTFOUND" in e.value.reason
    assert calls[0][-1] == peers.PORTKEY_SPEC


def test_without_node_portkey_says_what_to_install(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    with pytest.raises(peers.PeerUnavailable, match="apt-get install -y nodejs npm"):
        peers.install_portkey(tmp_path, _fake(0)[1])


def test_an_installed_portkey_of_the_pin_is_reused(tmp_path: Path) -> None:
    entry = peers.portkey_entry(tmp_path)
    entry.parent.mkdir(parents=True)
    entry.touch()
    (entry.parent.parent / "package.json").write_text(
        orjson.dumps({"version": peers.PORTKEY_VERSION}).decode()
    )
    calls, run = _fake(1)
    assert peers.install_portkey(tmp_path, run) == entry
    assert calls == []


# ---------------------------------------------------------------------------- the table


def _run(rps: float, p50: float, p99: float, non2xx: int = 0, requests: int = 1000) -> Any:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non2xx": non2xx, "socket_errors": 0,
            "requests": requests}  # fmt: skip


def _scenario(label: str, rps: float, p50: float, cpu: float, rss: float, non2xx: int = 0) -> Any:
    return {"label": label, "c1": _run(100, p50, p50 * 2), "c8": _run(500, p50, p50 * 2),
            "c32": _run(rps, p50 * 4, p50 * 8, non2xx), "cpu_s_per_1k": cpu, "rss_load_mb": rss,
            "foreign_cpu_pct": 12.5}  # fmt: skip


def _results() -> dict[str, Any]:
    return {
        "environment": {"date": "2026-12-02T00:00:00+00:00", "host_cpus": 2, "kernel": "6",
                        "python": "3.11", "loadavg_start": ["1", "1", "1"],
                        "loadavg_end": ["2", "2", "2"]},
        "duration_s": 3.0,
        "quick": True,
        "scenarios": {
            "a": _scenario("upstream direct", 20000, 0.1, 0.01, 5),
            "c": _scenario("router x1, round_robin, Redis on", 3000, 0.5, 0.3, 80),
            "c-info": _scenario("router x1, round_robin, decision log at INFO", 2800, 0.55, 0.32,
                                82),
        },
        "peers": {
            "litellm-usage": {**_scenario("LiteLLM proxy", 600, 2.1, 1.5, 400, non2xx=30),
                              "verified": {"requests": 30, "upstream_served": 30,
                                           "targets": {"up0": 10, "up1": 10, "up2": 10}},
                              "processes": 1, "redis_reads_per_req": 2.5},
            "portkey": {"label": "Portkey gateway", "error": "Portkey could not be installed: "
                        "`npm install` exited 1 | ENOTFOUND"},
        },
    }  # fmt: skip


def test_the_ratios_are_ours_over_each_peer() -> None:
    res = _results()
    a = res["scenarios"]["a"]["c1"]
    ours = peers.row_from_scenario("c", res["scenarios"]["c"], a["p50_ms"], a["p99_ms"])
    lite = peers.row_from_scenario("l", res["peers"]["litellm-usage"], a["p50_ms"], a["p99_ms"])
    assert lite.added_p50_ms == pytest.approx(2.0)
    assert (lite.errors, lite.requests) == (30, 3000)
    rows = peers.comparison_table(ours, [lite])
    assert rows[0].count("|") == rows[1].count("|") == rows[2].count("|") == rows[3].count("|")
    assert "| 5.00x | 0.20x | 0.20x | 0.20x |" in rows[3]  # 3000/600, 0.4/2.0, 0.3/1.5, 80/400
    assert "1.00% (30)" in rows[3]


def test_a_peer_that_failed_is_shown_as_not_measured() -> None:
    ours = peers.Row("c", "ours", rps=3000, added_p50_ms=0.4, cpu_s_per_1k=0.3, rss_mb=80)
    failed = peers.row_from_scenario("portkey", _results()["peers"]["portkey"], 0.1, 0.2)
    rows = peers.comparison_table(ours, [failed])
    assert rows[-1].startswith("| Portkey gateway | NOT MEASURED: Portkey could not be installed")
    assert "ENOTFOUND" in rows[-1]
    assert rows[-1].count("|") == rows[0].count("|")  # its own '|' does not break the row


def test_a_ratio_needs_both_figures() -> None:
    assert peers.ratio(1.0, 0.0) == "-"
    assert peers.ratio(None, 2.0) == "-"
    assert peers.ratio(3.0, 2.0) == "1.50x"


def test_the_report_has_the_table_the_checks_and_the_failures() -> None:
    text = bench.peers_markdown(_results())
    assert "| router x1, round_robin, Redis on |" in text
    assert "| router x1, round_robin, decision log at INFO |" in text
    assert "| LiteLLM proxy | 600 |" in text
    assert "NOT MEASURED" in text
    assert "litellm-usage: checked first: 30 requests all 200" in text
    assert "{'up0': 10, 'up1': 10, 'up2': 10}" in text


def test_a_failed_peer_fails_the_run() -> None:
    assert bench._peers_failed([]) == 0
    assert bench._peers_failed(["portkey: npm unreachable"]) == 1
