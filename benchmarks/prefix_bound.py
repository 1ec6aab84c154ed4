"""Shared-prefix SAMI steps against their bound, on SmolLM2-135M (fp32, train mode) on CPU.

Steps (each: matrix + SAMI loss + backward, gradients from zero):

* ``bound``: forward+backward over the unique tokens only: the C prompts in one
  batch and the C*R responses (without their last token) in another batch that
  attends to no prompt, the LM head only where a response token is predicted
  (each prompt's last hidden state and the response positions): strictly less
  work than any exact method;
* ``logprob_matrix``: ``sami_loss(logprob_matrix(...)).backward()``;
* ``sami_backward``: ``sami_backward(..., micro_batch_size=16)``;
* ``logprob_matrix_held``, ``sami_backward_held``: the same with a ``logits_budget`` (1 GiB)
  that keeps the LM-head logits for the backward instead of recomputing them;
  ``sami_backward_mb8``: 8 pairs per chunk (less memory);
* ``original``: all C*R ``prompt ++ response`` sequences with full logits
  (``benchmarks.suites.step``); skipped where it would not fit in memory.

Times: one process, the steps interleaved (round-robin over sizes and steps),
median of ``--rounds``. Peak memory: each (step, C) once in a fresh subprocess,
its resident-set high-water mark (VmHWM) and the step's extra over what existed
before it. Prompts 250-259 tokens, responses 44-58 tokens (seeded, random ids), B = 1.

Run from the repository root: ``python -m benchmarks.prefix_bound`` (``--help``).
"""

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

import torch

from sami_fast import sami_loss
from benchmarks.runner import CaseSkipped, _status_kib, peak_memory_mb
from benchmarks.suites.step import _fast_step, _gradcache_step, _original_step
from sami_fast.hf import load_smollm2
from sami_fast.sequence_logprobs import sequence_logprobs

PROMPT_LENGTHS = (250, 259)
RESPONSE_LENGTHS = (44, 58)
MICRO_BATCH_SIZE = 16


def problem(C: int, vocab: int):
    """One query: C prompts and C responses of random ids and seeded ragged lengths."""
    generator = torch.Generator().manual_seed(C)

    def ids(low, high):
        n = int(torch.randint(low, high + 1, (), generator=generator))
        return torch.randint(3, vocab, (n,), generator=generator)

    return [[ids(*PROMPT_LENGTHS) for _ in range(C)]], [[ids(*RESPONSE_LENGTHS) for _ in range(C)]]


def _right_padded(sequences):
    tokens = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    lengths = torch.tensor([len(s) for s in sequences])
    return tokens, (torch.arange(tokens.shape[1]) < lengths[:, None]).long(), lengths


def _bound_step(model, prompts, responses):
    decoder, head = model.model, model.get_output_embeddings().weight
    C, R = len(prompts[0]), len(responses[0])
    prompt_tokens, prompt_mask, prompt_lengths = _right_padded(prompts[0])
    pairs = [responses[0][j] for _ in range(C) for j in range(R)]
    fed_tokens, fed_mask, _ = _right_padded([r[:-1] for r in pairs])
    lengths = torch.tensor([len(r) for r in pairs])
    # Head rows of pair i: its first target from its prompt's last state, the others from the response positions.
    prompt_width, fed_width = prompt_tokens.shape[1], fed_tokens.shape[1]
    rows = []
    for i, response in enumerate(pairs):
        k = i // R
        rows.append(k * prompt_width + int(prompt_lengths[k]) - 1)
        rows.extend(C * prompt_width + i * fed_width + t for t in range(len(response) - 1))
    rows = torch.tensor(rows)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    targets = torch.cat(pairs)

    def run():
        model.zero_grad(set_to_none=True)
        prompt_hidden = decoder(input_ids=prompt_tokens, attention_mask=prompt_mask, use_cache=False).last_hidden_state
        fed_hidden = decoder(input_ids=fed_tokens, attention_mask=fed_mask, use_cache=False).last_hidden_state
        hidden = torch.cat([prompt_hidden.reshape(-1, prompt_hidden.shape[-1]),
                            fed_hidden.reshape(-1, fed_hidden.shape[-1])])
        scores = sequence_logprobs(hidden.index_select(0, rows), head, targets, shift=False, cu_seqlens=cu_seqlens)
        loss = sami_loss(scores.reshape(1, C, R))
        loss.backward()
        return loss

    return run


STEPS = {"bound": _bound_step, "logprob_matrix": _fast_step,
         "logprob_matrix_held": functools.partial(_fast_step, logits_budget=2**30),
         "sami_backward": functools.partial(_gradcache_step, micro_batch_size=MICRO_BATCH_SIZE),
         "sami_backward_held": functools.partial(_gradcache_step, micro_batch_size=MICRO_BATCH_SIZE,
                                                 logits_budget=2**30),
         "sami_backward_mb8": functools.partial(_gradcache_step, micro_batch_size=8),
         "original": _original_step}


def _model():
    model, _ = load_smollm2(torch.float32)
    return model.train()


def _setup(model, name: str, C: int):
    prompts, responses = problem(C, model.config.vocab_size)
    return STEPS[name](model, prompts, responses)


def timings(sizes, rounds: int, steps) -> dict:
    """{(step, C): [(wall s, process CPU s) per round]}, the steps interleaved; a step that does not fit maps to
    its reason."""
    model = _model()
    runs, times = {}, {}
    for C in sizes:
        for name in steps:
            try:
                runs[name, C] = _setup(model, name, C)
                times[name, C] = []
            except CaseSkipped as skipped:
                times[name, C] = str(skipped)
    for index in range(rounds):
        for (name, C), run in runs.items():
            start, cpu = time.perf_counter(), time.process_time()
            run()
            times[name, C].append((time.perf_counter() - start, time.process_time() - cpu))
            print(f"round {index + 1}: {name} C=R={C}: {times[name, C][-1][0]:.1f} s wall, "
                  f"{times[name, C][-1][1]:.1f} s CPU", file=sys.stderr, flush=True)
    return times


def peak_in_this_process(name: str, C: int) -> dict:
    model = _model()
    try:
        run = _setup(model, name, C)
    except CaseSkipped as skipped:
        return {"skipped": str(skipped)}
    start, cpu = time.perf_counter(), time.process_time()
    extra = peak_memory_mb(run, "cpu")
    return {"extra_mb": extra, "vmhwm_mb": _status_kib("VmHWM") / 1024, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def peak(name: str, C: int) -> dict:
    """One step of ``name`` at C = R = ``C`` in a fresh subprocess: its memory (MB) and time."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.prefix_bound", "--threads", str(torch.get_num_threads()),
                          "--peak-of", name, str(C)], capture_output=True, text=True)
    if out.returncode:  # e.g. killed for memory: a row saying so, not the end of the run
        result = {"skipped": f"the subprocess failed (exit status {out.returncode}): {out.stderr.strip()[-200:]}"}
    else:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak: {name} C=R={C}: {result}", file=sys.stderr, flush=True)
    return result


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8], help="C = R values to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--peak-sizes", type=int, nargs="*", default=None,
                        help="C = R values for the fresh-process peak memory (default: --sizes)")
    parser.add_argument("--peak-steps", nargs="*", default=None, choices=list(STEPS),
                        help="steps for the peak memory (default: --steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--peak-of", nargs=2, metavar=("STEP", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps(peak_in_this_process(args.peak_of[0], int(args.peak_of[1]))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average before (1, 5, 15 min): "
          f"{_load()}", flush=True)
    times = timings(args.sizes, args.rounds, args.steps) if args.rounds > 0 else {}
    print(f"load average after timing: {_load()}", flush=True)
    peak_sizes = args.sizes if args.peak_sizes is None else args.peak_sizes
    peak_steps = args.steps if args.peak_steps is None else args.peak_steps
    peaks = {(name, C): peak(name, C) for C in peak_sizes for name in peak_steps}
    print(f"load average after peak memory: {_load()}", flush=True)
    print("\n| C = R | step | wall s per round | median wall s | x bound (wall) | CPU s per round | median CPU s "
          "| x bound (CPU) |\n|---|---|---|---|---|---|---|---|")
    for (name, C), measured in times.items():
        if isinstance(measured, str):
            print(f"| {C} | {name} | not run: {measured} | - | - | - | - | - |")
            continue
        bound = times.get(("bound", C))
        cells = []
        for column in (0, 1):
            values = [m[column] for m in measured]
            median = statistics.median(values)
            ratio = (f"{median / statistics.median(m[column] for m in bound):.2f}" if isinstance(bound, list)
                     else "-")
            cells += [", ".join(f"{v:.1f}" for v in values), f"{median:.1f}", ratio]
        print(f"| {C} | {name} | {' | '.join(cells)} |")
    print("\n| C = R | step | peak RSS (VmHWM) MB | step's extra MB | step wall s | step CPU s |\n"
          "|---|---|---|---|---|---|")
    for (name, C), measured in peaks.items():
        if "skipped" in measured:
            print(f"| {C} | {name} | not run: {measured['skipped']} | - | - | - |")
        else:
            print(f"| {C} | {name} | {measured['vmhwm_mb']:.0f} | {measured['extra_mb']:.0f} | "
                  f"{measured['seconds']:.1f} | {measured['cpu_seconds']:.1f} |")


if __name__ == "__main__":
    main()
