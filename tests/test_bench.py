"""The benchmark runner (``benchmarks/``): its quick path on tiny shapes, the correctness gate,
rows for peers that cannot run, the CSV's columns, the plots, memory measurement, the CLI."""

import csv
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import cli as bench_cli
from benchmarks import head_floor, runner
from benchmarks.suites import logprobs, loss, step
from sami_fast import chunked
from sami_fast.cli import main as sami_fast_main

TINY_STEP_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture
def tiny_suites(monkeypatch):
    """Every suite's quick shapes shrunk to tiny ones; cut-cross-entropy reported as not
    installed (its torch_compile implementation compiles for tens of seconds)."""
    monkeypatch.setattr(loss, "SHAPES", {"quick": [(1, 2), (3, 4)]})
    monkeypatch.setitem(logprobs.HEADS["cpu"], "quick", (torch.float32, 16, 64))
    monkeypatch.setitem(logprobs.HEAD_SHAPES["cpu"], "quick", [(2, 9, 0.5), (2, 9, 1.0)])
    monkeypatch.setitem(logprobs.LOGITS_SHAPES["cpu"], "quick", [(2, 9, 0.5)])
    monkeypatch.setitem(step.SIZES, "quick", ((2,), (2,), 6, 3, 1))
    monkeypatch.setattr(step, "_SMOLLM2", TINY_STEP_MODEL)
    step._model.cache_clear()
    real_missing = runner.module_missing
    monkeypatch.setattr(logprobs, "module_missing",
                        lambda name: "not installed" if name == "cut_cross_entropy" else real_missing(name))
    yield
    step._model.cache_clear()


def test_quick_run_writes_every_column_the_status_rows_and_plots(tiny_suites, tmp_path, capsys):
    assert bench_cli.main(["--device", "cpu", "--out", str(tmp_path), "--no-progress", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    for heading in ("[sami_loss]", "[lm_head]", "[get_batch_logprobs]", "[sami_step]"):
        assert heading in printed
    with open(tmp_path / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == list(runner.CSV_FIELDS)
    for record in records:
        empty = [name for name in runner.CSV_FIELDS if name != "spread" and not record[name]]
        assert not empty, (empty, record)
    assert {r["suite"] for r in records} == set(runner.SUITES)
    timed = [r for r in records if r["metric"] == "time_ms"]
    low, high = (float(v) for v in timed[0]["spread"].split("-"))
    assert low <= float(timed[0]["value"]) <= high
    assert {r["candidate"] for r in timed} >= {"naive", "sami_fast[torch]", "torch_lce_chunked",
                                               "torch_lce_reference", "original", "sami_backward[torch]"}
    status = {(r["candidate"], r["spread"]) for r in records if r["metric"] == "status"}
    assert ("cce[torch_compile]", "not installed") in status
    assert ("sami_fast[triton]", "CUDA only (CPU: Triton's interpreter, for tests)") in status
    assert any(name == "liger" and reason in ("not installed", "CUDA only") for name, reason in status)
    head = [r for r in records if r["case"].startswith("lm_head") and r["candidate"] == "sami_fast[torch]"]
    assert {r["metric"] for r in head} == {"time_ms", "peak_mb", "time_vs_original", "time_vs_peer"}
    assert records[0]["device"] == runner.device_name("cpu") and records[0]["torch"] == torch.__version__
    import matplotlib.image

    for suite in runner.SUITES:
        image = matplotlib.image.imread(tmp_path / f"{suite}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # A second run appends below the same header.
    assert bench_cli.main(["--suite", "loss", "--out", str(tmp_path), "--no-progress", "--repeats", "1"]) == 0
    with open(tmp_path / "results.csv") as f:
        assert sum(line.startswith("suite,") for line in f) == 1


def _tiny_head_case(extra):
    """The tiny lm_head case at 50% scored with the candidates ``extra`` appended."""
    shape = (torch.float32, 2, 9, 16, 64, 0.5)
    case = [c for c in logprobs.cases("cpu", "quick") if c.kernel == "lm_head"][0]
    case.candidates = [c for c in case.candidates if c.name in ("naive", "sami_fast[torch]")]
    case.candidates += [logprobs._head_candidate(name, "peer", "cpu", shape, forward) for name, forward in extra]
    return case


def test_gate_reports_wrong_candidates_and_never_ranks_them(tiny_suites):
    def off_by_a_little(h, w, y):  # values 1e-4 too high
        return logprobs.naive_head(h, w, y) + 1e-4

    def wrong_gradient(h, w, y):  # right values, no gradient through the head's weight
        return logprobs.naive_head(h, w.detach(), y)

    def wrong_shape(h, w, y):
        return logprobs.naive_head(h, w, y)[:1]

    case = _tiny_head_case([("off", off_by_a_little), ("no_d_weight", wrong_gradient), ("short", wrong_shape),
                            ("right_peer", logprobs.torch_linear_cross_entropy)])
    rows = {r["candidate"]: r for r in runner.run_case(case, "cpu", repeats=1)}
    assert rows["off"]["status"] == "wrong" and "value off by" in rows["off"]["reason"]
    assert rows["no_d_weight"]["status"] == "wrong" and "d_weight" in rows["no_d_weight"]["reason"]
    assert rows["short"]["status"] == "wrong" and "shape" in rows["short"]["reason"]
    for name in ("naive", "sami_fast[torch]", "right_peer"):
        assert rows[name]["status"] == "ok", rows[name]
    for name in ("off", "no_d_weight", "short"):
        assert "time_ms" not in rows[name] and "vs_peer" not in rows[name]
    # The best peer is the only correct peer: the wrong ones never count.
    assert rows["right_peer"]["vs_peer"] == 1.0
    table = runner.format_tables(list(rows.values()))
    assert "wrong" in table and "value off by" in table


def test_a_failing_candidate_is_an_error_row_and_the_rest_still_run(tiny_suites):
    def broken(h, w, y):
        raise RuntimeError("no such kernel")

    rows = {r["candidate"]: r for r in runner.run_case(_tiny_head_case([("broken", broken)]), "cpu", repeats=1)}
    assert rows["broken"]["status"] == "error" and "no such kernel" in rows["broken"]["reason"]
    assert rows["sami_fast[torch]"]["status"] == "ok"


def test_a_torch_without_linear_cross_entropy_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    peers = {name: reason for name, _, reason in logprobs.head_peers("cpu")}
    assert peers["torch_lce_chunked"] == peers["torch_lce_reference"] == f"not in torch {torch.__version__}"


def _allocating_run(megabytes):
    def run():
        buffer = torch.empty(megabytes * 2**20 // 4)
        buffer.fill_(1.0)  # touch every page so that it is resident
        return buffer.sum()

    return run


@pytest.mark.parametrize("megabytes", [8, 64, 256])
def test_cpu_peak_memory_is_what_a_run_allocates(megabytes):
    """Also when the allocator holds freed blocks of that size from an earlier run (which the
    run would reuse without new pages): the measurement hands them back first."""
    _allocating_run(megabytes)()
    held = [torch.empty(megabytes * 2**18) for _ in range(4)]  # freed next: may stay in malloc's free lists
    del held
    peak = runner.peak_memory_mb(_allocating_run(megabytes), "cpu")
    assert megabytes * 0.9 <= peak <= megabytes * 1.25 + 2


def test_with_backend_sets_and_restores_the_backend(monkeypatch):
    monkeypatch.delenv("SAMI_FAST_BACKEND", raising=False)
    assert runner.with_backend("torch", lambda: os.environ["SAMI_FAST_BACKEND"]) == "torch"
    assert "SAMI_FAST_BACKEND" not in os.environ
    monkeypatch.setenv("SAMI_FAST_BACKEND", "auto")
    with pytest.raises(KeyError):
        runner.with_backend("triton", lambda: {}["raised inside"])
    assert os.environ["SAMI_FAST_BACKEND"] == "auto"


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be at least 1"),
    (["--repeats", "x"], "--repeats: must be a positive integer"),
    (["--suite", "bogus"], "--suite: invalid choice"),
    (["--topics", "bogus"], "unrecognized arguments: --topics"),
    (["--size", "small"], "--size: invalid choice"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sami_fast_main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sami_fast_bench_help_comes_from_the_runner(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sami_fast_main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: sami-fast bench") and "default: 3 on CPU" in text and "D=576, V=49152" in text
    with pytest.raises(SystemExit):
        sami_fast_main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_cli_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert sami_fast_main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_imports_and_its_cpu_parts_run(capsys, monkeypatch):
    """benchmarks/gpu_check.py, loaded as the script it is: the correctness checks at tiny
    shapes on the CPU, the bar summary over runner rows, and no GPU: exit status 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", runner.ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "_stop_at_hard_limit", lambda *_: None)  # its watchdog would end pytest
    assert gpu_check.main(["--cpu-dry-run"]) == 0
    if not torch.cuda.is_available():
        assert gpu_check.main(["--skip-checks"]) == 2
    row = dict(status="ok", kernel="lm_head", case="rows=8", time_min=1.0, time_max=1.0)
    ours = {**row, "candidate": "sami_fast[triton]", "role": "sami_fast", "time_ms": 1.0, "peak_mb": 5.0}
    gpu_check.print_bars([ours,
                          {**row, "candidate": "liger", "role": "peer", "time_ms": 2.0, "peak_mb": 4.0},
                          {"status": "n/a", "kernel": "lm_head", "case": "rows=8", "candidate": "cce", "role": "peer"}])
    bars = capsys.readouterr().out
    assert "vs best peer liger 2.00 ms (OK)" in bars and "vs liger 4 MB (OVER)" in bars


class _MatrixProductFlops(TorchDispatchMode):
    """2·M·K·N for each mm and in-place addmm (FlopCounterMode skips the in-place one)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        products = {torch.ops.aten.mm.default: args[:2], torch.ops.aten.mm.out: args[:2],
                    torch.ops.aten.addmm_.default: args[1:3]}
        if func in products:
            a, b = products[func]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute, products", [(True, 8), (False, 6)])
def test_head_floor_runs_the_stated_products(recompute, products, monkeypatch):
    # Several row tiles and vocabulary blocks, the last of each ragged.
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 7 * 16)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 16)
    rows, weight = torch.randn(23, 5), torch.randn(37, 5)
    run = head_floor.matrix_products(rows, weight, recompute)
    with _MatrixProductFlops() as counted:
        run()
    assert counted.flops == products * 23 * 5 * 37


def test_head_floor_prints_a_row_per_share_and_row(capsys):
    rows = ["products 8NDV", "sami_fast", "sami_fast held"]
    assert head_floor.main(["--shape", "2", "9", "8", "40", "--rounds", "1", "--scored", "1.0", "0.5",
                            "--rows", *rows]) == 0
    printed = capsys.readouterr().out
    for share in ("100%", "50%"):
        for row in rows:
            assert f"| {share} | {row} |" in printed


def test_cuda_step_cases_have_sami_shapes():
    # Built without a GPU: a case's model and data are made only when it runs.
    cases = {case.params["C"]: case for case in step.cases("cuda", "full")}
    assert sorted(cases) == [2, 8]
    assert [case.name.split(" ideal")[0] for case in cases.values()] == ["C=R=2 Lp=512 Lr=128", "C=R=8 Lp=512 Lr=128"]
    for C, case in cases.items():
        names = [candidate.name for candidate in case.candidates]
        assert "original" in names and any(name.startswith("sami_fast[") for name in names)
        assert any(name.startswith("sami_backward[") for name in names) == (C == 8)
