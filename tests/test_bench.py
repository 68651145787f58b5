"""`megfb bench` at quick sizes: every case runs, fast equals plain, the report adds up."""
import json
import subprocess
import sys

from megfb import bench


def test_quick_bench_runs_every_case_and_checks_exactness(tmp_path):
    # in its own process: the bench clears MegEngine's kernel cache between paths, and that
    # process-wide state should not leak into the other tests
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-c", "import sys; from megfb.cli import main; sys.exit(main())",
                          "bench", "--quick", "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    cases = {(r["case"], r["batch"]) for r in res["rows"]}
    lite = f"infer lite x{res['workers']}"
    for case in ("infer plain", "infer fast", lite, "infer fast+trace", "pmrid infer"):
        assert {(case, 1), (case, 8)} <= cases
    assert {("train step plain", 8), ("train step fast", 8), (f"lite x{res['workers']}, malloc dflt", 8)} <= cases
    # megfb's native operator is used where it builds, and then measured against MegEngine's kernels
    assert (("train fast, no native", 8) in cases) == (res["native"] == "on")
    # training runs on the trainer's inline device, compared with the default device's worker
    assert ("train fast, worker dev", 8) in cases and res["train_device"] == "cpu:default"
    assert "inline_train" in res["ratios"]
    assert len(res["max_rel_diff"]) == 6 and max(res["max_rel_diff"].values()) < 1e-4
    assert res["peak_gflops"] == max(res["matmul_peak_gflops"], res["conv1x1_peak_gflops"]) > 0
    assert res["all_core_peak_gflops"] > 0
    assert all(r["cores_busy"] > 0 and r["gflops"] > 0 for r in res["rows"])
    assert all(v > 0 for v in res["ratios"].values())
    assert res["profile_fast"] and res["profile_plain"]
    # the fast path has neither the scalar-erf GELU nor the POW of the plain LayerNorm
    assert not {"GELU", "POW"} & {p["op"] for p in res["profile_fast"]}
    table = bench.format_table(res)
    assert "speed-up vs plain" in table and "GEMM peak" in table and "all cores" in table
    assert "inline CPU device cpu:default" in table
