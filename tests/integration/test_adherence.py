"""Two replicas at twice the offered load keep three providers at their limits, never over.

The short version of ``python -m loadtest.adherence``: 20 s, limits small enough that the
providers' 60-second windows fill within the run (120 + 90 + 60 = 270 requests), offered at
27 requests/s, so 540 requests arrive: twice the combined limit. The window cannot slide in
20 s, so utilisation is the peak window fill, sum(rpm_peak) / sum(rpm limits).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import adherence

LIMITS = (120, 90, 60)
DURATION_S = 20.0
RATE = 2 * sum(LIMITS) / DURATION_S  # offered in 20 s = twice the combined limit


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_providers_never_see_429_and_stay_full(tmp_path: Path) -> None:
    opts = adherence.Options(
        duration=DURATION_S, replicas=2, strategy="headroom", limits=LIMITS, rate=RATE
    )

    res = adherence.run(opts, tmp_path)

    print(adherence.render(res))
    assert res["offered"] >= 2 * sum(LIMITS) - 1
    assert res["provider_429s"] == 0, res["providers"]
    assert res["utilisation"]["method"].startswith("peak window fill")
    assert res["utilisation"]["value"] >= adherence.TARGET, res["providers"]
    assert res["client_outcomes"].get("200", 0) <= sum(LIMITS)
    assert not [k for k in res["client_outcomes"] if k.startswith("error")], res
