"""Trace generator and bench report: pure functions."""
import statistics

from kvrouter.bench import report, trace


def test_trace_is_deterministic_and_power_law():
    models = ["a", "b", "c", "d"]
    one = trace.generate(models, 3600, 4.0, alpha=1.0, cv=2.0, on_seconds=1e9, off_seconds=0,
                         seed=7)
    two = trace.generate(models, 3600, 4.0, alpha=1.0, cv=2.0, on_seconds=1e9, off_seconds=0,
                         seed=7)
    assert one == two
    counts = {m: sum(1 for r in one if r["model"] == m) for m in models}
    assert counts["a"] > counts["b"] > counts["c"] > counts["d"] > 0
    # weights 1 : 1/2 : 1/3 : 1/4 of 4 req/s over an hour
    assert abs(counts["a"] - 3600 * 4 / (1 + 1 / 2 + 1 / 3 + 1 / 4)) < 0.1 * counts["a"]
    assert all(one[i]["time"] <= one[i + 1]["time"] for i in range(len(one) - 1))


def test_gamma_gaps_have_the_requested_cv():
    rows = trace.generate(["a"], 20000, 2.0, cv=3.0, on_seconds=1e9, off_seconds=0, seed=1)
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert 2.5 < cv < 3.5


def test_on_off_periods_leave_idle_gaps():
    rows = trace.generate(["a"], 3000, 5.0, cv=1.0, on_seconds=30, off_seconds=120, seed=3)
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    assert max(gaps) > 60  # idle long enough for a model to go to sleep


def test_trace_round_trip(tmp_path):
    rows = trace.generate(["a", "b"], 60, 2.0, seed=0)
    path = tmp_path / "t.jsonl"
    trace.write(rows, str(path))
    assert trace.read(str(path)) == rows


def test_report_stats_and_goodput():
    samples = []
    for i in range(10):
        s = report.Sample("m", 0.0)
        s.ok = True
        s.ttft = 0.1 * (i + 1)
        s.e2e = s.ttft + 0.9
        s.output_tokens = 10
        s.itls = [0.1] * 9
        samples.append(s)
    bad = report.Sample("m", 0.0)
    bad.error = "http_5xx"
    samples.append(bad)
    out = report.summarize(samples, 10.0, {"ttft": 0.5})
    assert out["completed"] == 10 and out["errors"] == {"http_5xx": 1}
    assert out["goodput"]["requests_meeting_slo"] == 5
    assert abs(out["tpot"]["mean"] - 0.1) < 1e-9
    assert out["request_throughput"] == 1.0 and out["output_token_throughput"] == 10.0


def test_csv_traces_and_bad_rows_say_where(tmp_path):
    import pytest

    from kvrouter.errors import KvrouterError

    good = tmp_path / "t.csv"
    good.write_text("time,model,prompt_tokens,output_tokens,user\n2.5,b,10,5,x\n1.0,a,20,7,y\n")
    assert trace.read(str(good)) == [
        {"time": 1.0, "model": "a", "prompt_tokens": 20, "output_tokens": 7},
        {"time": 2.5, "model": "b", "prompt_tokens": 10, "output_tokens": 5}]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,model,prompt_tokens\n1,a,3\n")
    with pytest.raises(KvrouterError, match=r"bad.csv:1: the header lacks output_tokens"):
        trace.read(str(bad))
    bad.write_text("time,model,prompt_tokens,output_tokens\n1,a,3,4\nsoon,a,3,4\n")
    with pytest.raises(KvrouterError, match=r"bad.csv:3: bad trace row"):
        trace.read(str(bad))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"time": 1, "model": "a", "prompt_tokens": 1, "output_tokens": 1}\n\n{"x": 1}\n')
    with pytest.raises(KvrouterError, match=r"bad.jsonl:3: bad trace row"):
        trace.read(str(lines))


def test_times_and_token_counts_that_would_hang_or_lie_are_refused_with_their_line(tmp_path):
    import pytest

    from kvrouter.errors import KvrouterError

    good = '{"time": 1, "model": "a", "prompt_tokens": 3, "output_tokens": 4}\n'
    for field, value, why in [
            ("time", "Infinity", "finite"), ("time", "NaN", "finite"), ("time", "1e308", "from 0"),
            ("time", "-1", "from 0"), ("prompt_tokens", "-5", "from 1"),
            ("output_tokens", "0", "from 1"), ("output_tokens", "2.5", "whole number"),
            ("prompt_tokens", "true", "number"), ("model", '""', "non-empty"),
            ("model", "7", "string")]:
        row = {"time": "1", "model": '"a"', "prompt_tokens": "3", "output_tokens": "4"}
        row[field] = value
        path = tmp_path / "t.jsonl"
        path.write_text(good + "{" + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}\n")
        with pytest.raises(KvrouterError, match=rf"t.jsonl:2: bad trace row: {field} .*{why}"):
            trace.read(str(path))
    path.write_text(good + "[1, 2]\n")
    with pytest.raises(KvrouterError, match=r"t.jsonl:2: bad trace row: a row is an object"):
        trace.read(str(path))


def test_a_trace_naming_models_the_config_lacks_is_refused_listing_what_it_has():
    import pytest

    from kvrouter.errors import KvrouterError

    rows = [{"time": 0.0, "model": m, "prompt_tokens": 1, "output_tokens": 1}
            for m in ("a", "b", "zz")]
    with pytest.raises(KvrouterError, match=r"t.jsonl: 1 model\(s\) of the trace are not in "
                       r"my.yaml: zz\. my.yaml has: a, b, c\."):
        trace.check_models("t.jsonl", rows, ["a", "b", "c"], "my.yaml")
    assert [r["model"] for r in trace.check_models("t.jsonl", rows, ["a", "b"], "my.yaml",
                                                    skip_unknown=True)] == ["a", "b"]
    with pytest.raises(KvrouterError, match="not in my.yaml"):  # none left: still an error
        trace.check_models("t.jsonl", rows, ["q"], "my.yaml", skip_unknown=True)


def test_a_replay_makes_each_request_when_its_time_comes():
    """`bench trace` hands the load generator an iterator: a long trace's prompts are made
    as it goes, never all held at once."""
    from kvrouter.bench.loadgen import Job, LoadGenerator, LoadSpec

    made, sent = [], []

    def jobs():
        for i in range(5):
            made.append(i)
            yield Job(i * 0.01, "m", "x", 1)

    gen = LoadGenerator(LoadSpec(base_url="http://127.0.0.1:9/v1", request_rate=1.0))
    gen.one = lambda job: sent.append((job.at, len(made)))
    gen.run(jobs(), total=5)
    made_when_sent = [n for _, n in sent]
    assert len(sent) == 5 and made_when_sent[0] <= 2 and made_when_sent[2] <= 4, made_when_sent


def test_a_mooncake_trace_becomes_a_multi_model_trace_that_keeps_its_shared_prefixes(tmp_path):
    import os
    import subprocess

    from kvrouter.bench import prompts
    from tests.helpers import PY

    src = os.path.join(os.path.dirname(__file__), "data", "traces",
                       "mooncake-conversation-head.jsonl")
    out = tmp_path / "t.jsonl"
    r = subprocess.run([PY, "-m", "kvrouter", "bench", "import-trace", "mooncake", src,
                        "--model", "a", "--model", "b", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 10 requests" in r.stdout, r.stderr
    rows = trace.read(str(out))
    assert [r["time"] for r in rows][-1] == 5.999 and rows[0]["prompt_tokens"] == 6758
    assert {r["model"] for r in rows} == {"a", "b"} and rows[0]["block_tokens"] == 512
    assert rows[0]["blocks"][:2] == (0, 1)
    # replayed, equal block ids are equal text: every prompt starts with block 0's 512 words
    texts = [prompts.from_blocks(r["blocks"], r["prompt_tokens"], 512).split()
             for r in rows[:3]]
    assert texts[0][:512] == texts[1][:512] == texts[2][:512]
    assert texts[0][512:1024] != texts[1][512:1024]
    assert len(texts[0]) == 6758
    # the same seed, the same assignment; stripe deals them in turn
    again = subprocess.run([PY, "-m", "kvrouter", "bench", "import-trace", "mooncake", src,
                            "--model", "a", "--model", "b", "--assign", "stripe", "--out",
                            str(tmp_path / "s.jsonl")], capture_output=True, text=True)
    assert again.returncode == 0
    assert [r["model"] for r in trace.read(str(tmp_path / "s.jsonl"))][:4] == ["a", "b", "a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": "x", "output_length": 1}\n')
    r = subprocess.run([PY, "-m", "kvrouter", "bench", "import-trace", "mooncake", str(bad),
                        "--model", "a", "--out", str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:1: not a Mooncake trace line" in r.stderr


def test_access_lines_from_journald_and_from_the_log_file_are_read(tmp_path):
    from kvrouter.bench import importers

    log = tmp_path / "j.log"
    log.write_text(
        "2026-12-07T05:00:01.500000+0000 host kvrouter[9]: INFO kvrouter.access: POST "
        "/v1/chat/completions model=a status=200 bytes=10 duration=0.500s rid=x "
        "outcome=success tokens=7/3\n"
        "2026-12-07T05:00:02.000000+0000 host kvrouter[9]: INFO kvrouter.access: POST "
        "/v1/completions model=- status=404 bytes=0 duration=0.001s rid=y outcome=unrouted\n"
        "2026-12-07T05:00:03.250000+0000 host kvrouter[9]: INFO kvrouter.access: POST "
        "/v1/completions model=b status=200 bytes=10 duration=0.250s rid=z outcome=success "
        "tokens=2/9\n"
        "2026-12-07T05:00:04.000000+0000 host kvrouter[9]: INFO kvrouter: reloaded\n")
    rows, missing = importers.access_log(str(log))
    assert missing == 0 and rows == [
        {"time": 0.0, "model": "a", "prompt_tokens": 7, "output_tokens": 3},
        {"time": 2.0, "model": "b", "prompt_tokens": 2, "output_tokens": 9}]
