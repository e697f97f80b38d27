"""Public traces (Azure LLM inference 2023, BurstGPT, ServeGen) into multi-model replays."""
import collections
import json
import random
import statistics
import subprocess

import pytest

from kvrouter.bench import public_traces as pt
from kvrouter.errors import KvrouterError
from tests.helpers import PY, ROOT

AZURE = f"{ROOT}/etc/lab/traces/AzureLLMInferenceTrace_code-head.csv"
SERVEGEN = f"{ROOT}/etc/lab/traces/servegen-m-mid-day2"
MODELS = [f"m{i}" for i in range(8)]


def test_azure_rows_keep_their_times_and_token_counts():
    rows = pt.azure(AZURE)
    assert len(rows) == 1482
    assert rows[0] == (0.0, "", 4808, 10)                      # as published
    assert rows[1][0] == pytest.approx(0.052, abs=1e-3)        # sub-second stamps kept
    assert all(a[0] <= b[0] for a, b in zip(rows, rows[1:]))
    assert 580 < rows[-1][0] < 600                             # the first ten minutes


def test_rules_give_every_request_to_one_model_with_a_seed():
    rows = pt.azure(AZURE)
    zipf = list(pt.assign(rows, MODELS, "zipf", seed=1))
    assert zipf == list(pt.assign(rows, MODELS, "zipf", seed=1))   # the seed decides
    counts = collections.Counter(r["model"] for r in zipf)
    assert counts["m0"] > 2.5 * counts["m7"]                  # popularity 1/rank
    stripe = [r["model"] for r in pt.assign(rows, MODELS, "stripe")]
    assert stripe[:9] == MODELS + ["m0"]
    windows = list(pt.assign(rows, MODELS, "windows"))
    span = rows[-1][0] / len(MODELS)
    assert max(r["time"] for r in windows) <= span + 1e-6      # windows overlaid from 0
    # each window is one model's traffic (the code trace has windows with no request)
    assert {r["model"] for r in windows} == {MODELS[min(7, int(t // span))] for t, *_ in rows}
    assert sorted(r["prompt_tokens"] for r in windows) == sorted(r[2] for r in rows)


def test_burstgpt_rows_by_client_and_failures_left_out(tmp_path):
    src = tmp_path / "BurstGPT_1.csv"
    src.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,472,18,490,Conversation log\n"
                   "7,GPT-4,1087,0,1087,Conversation log\n"        # failed: no response
                   "9,ChatGPT,500,20,520,Conversation log\n"
                   "12,GPT-4,300,40,340,API log\n")
    rows = pt.burstgpt(str(src))
    assert rows == [(0.0, "ChatGPT", 472, 18), (4.0, "ChatGPT", 500, 20),
                    (7.0, "GPT-4", 300, 40)]
    out = list(pt.assign(rows, ["a", "b"], "client"))
    assert [r["model"] for r in out] == ["a", "a", "b"]      # the busiest client first


def test_servegen_clients_keep_their_shares_and_burstiness_at_a_lower_rate():
    day2 = 86400.0
    rows = pt.servegen(SERVEGEN, day2 + 6 * 3600, 3600, random.Random(1), clients=4, rate=5.0)
    assert len(rows) == pytest.approx(5.0 * 3600, rel=0.05)
    clients = collections.Counter(key for _, key, _, _ in rows)
    assert len(clients) == 4
    assert all(0 <= t < 3600 + 1 for t, _, _, _ in rows)
    busiest = clients.most_common(1)[0][0]
    times = [t for t, key, _, _ in rows if key == busiest]
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    assert statistics.pstdev(gaps) / statistics.mean(gaps) > 1.5   # burstier than Poisson
    out = list(pt.assign(rows, ["a", "b", "c", "d"], "client"))
    assert collections.Counter(r["model"] for r in out)["a"] == clients[busiest]


def test_servegen_token_distributions_are_drawn_when_the_folder_has_them(tmp_path):
    (tmp_path / "chunk-1-trace.csv").write_text("0,2.0,1.0,Gamma,1.0,0.5\n")
    (tmp_path / "chunk-1-dataset.json").write_text(json.dumps(
        {"0": {"input_tokens": "{100: 0.5, 300: 0.5}", "output_tokens": "{7: 1.0}"}}))
    rows = pt.servegen(str(tmp_path), 0, 600, random.Random(2))
    assert {p for _, _, p, _ in rows} == {100, 300} and {o for *_, o in rows} == {7}


def test_bad_files_say_where(tmp_path):
    bad = tmp_path / "az.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,x,3\n")
    with pytest.raises(KvrouterError, match=r"az.csv:2: not an Azure LLM trace row"):
        pt.azure(str(bad))
    bad.write_text("time,tokens\n1,2\n")
    with pytest.raises(KvrouterError, match="no column TIMESTAMP"):
        pt.azure(str(bad))
    (tmp_path / "chunk-3-trace.csv").write_text("0,1.0,1.0,Pareto,1,1\n")
    with pytest.raises(KvrouterError, match=r"chunk-3-trace.csv:1: unknown arrival pattern"):
        pt.servegen(str(tmp_path), 0, 600, random.Random(0))
    with pytest.raises(KvrouterError, match="--assign 'nope': choose from zipf"):
        list(pt.assign([(0.0, "", 1, 1)], ["a"], "nope"))


def test_import_trace_command_writes_a_replayable_trace(tmp_path):
    out = tmp_path / "az.jsonl"
    r = subprocess.run([PY, "-m", "kvrouter", "bench", "import-trace", "azure", AZURE,
                        "--model", "a", "--model", "b", "--seed", "3", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 1482 requests" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["model"] for r in rows} == {"a", "b"}
    r = subprocess.run([PY, "-m", "kvrouter", "bench", "import-trace", "servegen", SERVEGEN,
                        "--model", "a", "--start", "93600", "--duration", "600", "--rate", "2",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 1000 < len(out.read_text().splitlines()) < 1400
