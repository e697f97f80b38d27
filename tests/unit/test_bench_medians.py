"""`make bench` runs the side-by-side rows several times and reports medians: each figure
the median of the runs, errors summed, each ratio the median of the runs' own ratios."""
from kvrouter.bench.sidebyside_report import medians, report


def run(kv_rps, yard_rps, errors=0):
    def row(rps, err=0):
        return {"rps": rps, "p50_ms": 0.3, "p99_ms": 1.0, "errors": err}
    return {"non_stream": {"fast": {"direct c=1": row(9000), "kvrouter c=1": row(3000),
                                    "kvrouter c=32": row(kv_rps, errors),
                                    "aiohttp c=32": row(yard_rps)}},
            "stream": {}, "stream_burst": {}, "notes": ["n"], "cpus": 2}


def test_figures_are_medians_errors_are_summed_and_ratios_show_every_run():
    r = medians([run(3000, 2000), run(1000, 1000, errors=2), run(3300, 2000)])
    row = r["non_stream"]["fast"]["kvrouter c=32"]
    assert row["rps"] == 3000 and row["errors"] == 2
    assert r["notes"] == ["n"] and len(r["runs"]) == 3
    text = "\n".join(report(r))
    # per run 1.50, 1.00, 1.65: the median of the ratios, not the ratio of the medians
    assert "kvrouter / aiohttp at c=32: 1.50x (runs: 1.50, 1.00, 1.65)" in text
    assert "medians of 3 runs" in text


def test_one_run_is_reported_as_it_is():
    r = medians([run(3000, 2000)])
    assert r["runs"] == [] and r["non_stream"]["fast"]["kvrouter c=32"]["rps"] == 3000
    assert "kvrouter / aiohttp at c=32: 1.50x\n" in "\n".join(report(r)) + "\n"
