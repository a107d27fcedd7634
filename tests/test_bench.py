"""`goodspec bench` end to end on a tiny trace: embedded server, two rates, two policies, two
repeats of each trace."""

import json
import subprocess
import sys


def test_bench_writes_consistent_json_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "goodspec.cli", "bench", "--model", "tiny", "--rates", "2,8", "--policies", "off,goodput",
         "--num-requests", "3", "--repeats", "2", "--max-output-tokens", "16", "--warmup", "1",
         "--out", str(out),
         "--num-cpus", "4", "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert {(s["rate"], s["policy"]) for s in data["summaries"]} == {(2.0, "off"), (2.0, "goodput"),
                                                                      (8.0, "off"), (8.0, "goodput")}
    assert len(data["records"]) == 4 * 3 * 2 and all(r["error"] is None for r in data["records"])
    for s in data["summaries"]:
        recs = [r for r in data["records"] if r["rate"] == s["rate"] and r["policy"] == s["policy"]]
        assert abs(s["mean_latency_s"] - sum(r["latency_s"] for r in recs) / len(recs)) < 1e-9
        assert s["errors"] == 0 and s["tokens_per_s"] > 0
        assert len(s["repeat_mean_latencies_s"]) == 2
        for rep, mean in enumerate(s["repeat_mean_latencies_s"]):
            lat = [r["latency_s"] for r in recs if r["repeat"] == rep]
            assert len(lat) == 3 and abs(mean - sum(lat) / 3) < 1e-9
    off = [r for r in data["records"] if r["policy"] == "off"]
    assert all(r["draft_tokens_proposed"] == 0 for r in off)
    # The same trace for both policies and both repeats: same prompts (by index) and arrivals.
    for rate in (2.0, 8.0):
        a = sorted((r["index"], r["arrival_s"], r["output_tokens"]) for r in data["records"]
                   if r["rate"] == rate and r["policy"] == "off")
        b = sorted((r["index"], r["arrival_s"], r["output_tokens"]) for r in data["records"]
                   if r["rate"] == rate and r["policy"] == "goodput")
        assert a == b and a[0::2] == a[1::2]  # each (index, arrival) twice: once per repeat
    assert [r["rate"] for r in data["ratios"]] == [2.0, 8.0]
    # goodput's step-time MAPE as the server reported it after its runs; none for a static policy
    assert all(s["step_time_mape"] is None for s in data["summaries"] if s["policy"] == "off")
    mapes = [r["goodput_step_time_mape"] for r in data["ratios"]]
    assert all(m is None or 0 < m < 1 for m in mapes)
    assert all(f"step-time MAPE = {m:.1%}" in res.stdout for m in mapes if m is not None)
    table = (out / "results.md").read_text()
    assert table.count("| goodput |") == 2 and "goodput / off" in table
    png = (out / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "goodput / best static" in res.stdout
