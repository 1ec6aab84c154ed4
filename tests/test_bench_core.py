import csv

import pytest
import torch

from sami_fast import bench
from sami_fast.cli import main


def _allocating_case(n_floats):
    def setup():
        def run():
            buf = torch.empty(n_floats)
            buf.fill_(1.0)  # touch every page so it is resident
            return buf.sum()
        return run
    return bench.Case("probe", "alloc", f"n={n_floats}", setup)


@pytest.mark.parametrize("megabytes", [64, 256])
def test_cpu_peak_memory_sees_what_a_run_allocates(megabytes):
    result = bench.measure(_allocating_case(megabytes * 2**20 // 4), "cpu", repeats=1)
    assert result["time_ms"] > 0
    assert megabytes * 0.9 <= result["peak_mb"] <= megabytes * 1.25


def test_run_cases_reports_errors_and_keeps_going():
    def broken_setup():
        raise RuntimeError("no such provider")

    cases = [bench.Case("probe", "broken", "x", broken_setup), _allocating_case(1024)]
    rows = bench.run_cases(cases, "cpu", repeats=1, log=lambda *_: None)
    assert "no such provider" in rows[0]["error"]
    assert "time_ms" in rows[1]
    table = bench.format_table(rows)
    assert "error" in table and "alloc ms" in table


def test_append_results_writes_liger_style_rows(tmp_path):
    rows = [{"kernel": "k", "provider": "p", "mode": "forward+backward", "x": "C=2", "time_ms": 1.5, "peak_mb": 3.0}]
    path = tmp_path / "r.csv"
    bench.append_results(str(path), rows, "cpu")
    bench.append_results(str(path), rows, "cpu")
    with open(path) as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == list(bench.RESULT_FIELDS)
    assert [r["metric"] for r in records] == ["time_ms", "peak_mb"] * 2
    assert records[0]["y"] == "1.5"


def test_unknown_topic_is_rejected():
    with pytest.raises(ValueError, match="topic"):
        bench.load_cases("nope", "cpu", "small")


def test_cli_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_case_this_machine_cannot_run_is_skipped_not_failed(tmp_path):
    def setup():
        raise bench.CaseSkipped(f"needs {bench.available_memory_bytes('cpu') * 2} bytes")

    rows = bench.run_cases([bench.Case("probe", "huge", "x", setup), _allocating_case(1024)], "cpu", repeats=1,
                           log=lambda *_: None)
    assert "needs" in rows[0]["skipped"] and "error" not in rows[0]
    assert "skipped" in bench.format_table(rows)
    path = tmp_path / "r.csv"
    bench.append_results(str(path), rows, "cpu")
    assert "huge" not in path.read_text()
