"""``loadtest.client_cost``'s arguments, its table against ours and the rounds' order (no
measurement: the figures are made up)."""

from __future__ import annotations

import pytest

from loadtest.client_cost import parse_args, rotated, summarize, table


def _round(rps: float, cpu: float, **extra: object) -> dict[str, object]:
    return {"requests": int(rps * 3), "bad": 0, "errors": [], "rps": rps, "cpu_s_per_1k": cpu,
            "cpu_util": 0.5,
            "p50_ms": 1.0, "p99_ms": 3.0, "ttfc_p50_ms": 2.0, "reads_per_req": 51.0,
            "rss_mb": 40.0, "rss_added_mb": 15.0, "foreign_cpu_pct": 10.0, **extra}  # fmt: skip


def test_defaults_measure_every_case() -> None:
    opts = parse_args([])
    assert (opts.concurrency, opts.duration, opts.case) == (32, 5.0, ["whole", "stream"])


def test_a_case_and_clients_can_be_chosen() -> None:
    opts = parse_args(["--case", "stream", "--client", "ours", "--client", "aiohttp"])
    assert opts.case == ["stream"]
    assert opts.client == ["ours", "aiohttp"]


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--duration", "0"], ["--client", "x"]])
def test_nonsense_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_each_round_starts_with_another_client() -> None:
    names = ["ours", "a", "b"]
    assert [rotated(names, k)[0] for k in range(4)] == ["ours", "a", "b", "ours"]


def test_the_table_gives_means_and_ratios_to_ours() -> None:
    runs = {
        "ours": [_round(1000, 0.02), _round(3000, 0.04)],
        "lib": [_round(1000, 0.06), _round(1000, 0.06)],
        "broken": [{"failed": "exit 1: ImportError"}],
    }
    lines = table("whole", summarize(runs))
    assert lines[0].startswith("| client | req/s | ratio | CPU s / 1k req | ratio |")
    assert lines[2].startswith("| ours | 2,000 (1,000-3,000) | 1.00 | 0.0300 | 1.00 | 50 |")
    assert lines[3].startswith("| lib | 1,000 (1,000-1,000) | 0.50 | 0.0600 | 2.00 | 50 |")
    assert lines[4] == "| broken | failed: exit 1: ImportError |"


def test_a_round_with_a_bad_answer_is_left_out() -> None:
    runs = {"ours": [_round(1000, 0.02), _round(9000, 0.01, bad=1)]}
    assert summarize(runs)["ours"]["rounds"] == 1


def test_the_stream_table_shows_first_chunk_and_reads() -> None:
    lines = table("stream", summarize({"ours": [_round(300, 0.5)]}))
    assert "first chunk p50 ms | chunks read / req" in lines[0]
    assert "| 2.00 | 51.0 |" in lines[2]
