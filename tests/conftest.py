"""Test setup: Triton runs in its interpreter so the kernels execute on CPU tensors.

TRITON_INTERPRET must be set before any module decorated with @triton.jit is
imported, because @triton.jit chooses the interpreter at decoration time.

SAMI_FAST_TEST_THREADS=N runs the suite with ``torch.set_num_threads(N)`` (the
default is torch's own choice): the bounds must hold whatever the thread count,
which changes the order of fp32 reductions.
"""

import contextlib
import os
import weakref

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

_THREADS = os.environ.get("SAMI_FAST_TEST_THREADS")
if _THREADS is not None:
    if not _THREADS.isdigit() or int(_THREADS) < 1:
        raise ValueError(f"SAMI_FAST_TEST_THREADS must be a positive integer, got {_THREADS!r}")
    torch.set_num_threads(int(_THREADS))


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()} (SAMI_FAST_TEST_THREADS={_THREADS or 'unset'})"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per backend through SAMI_FAST_BACKEND."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def head_tiles(monkeypatch):
    """A list gaining one entry per tile of logits the torch LM-head path computes with W
    (``sami_fast.chunked._Head.logits``): a backward that reads held logits adds none."""
    from sami_fast import chunked

    tiles = []
    compute = chunked._Head.logits

    def counted(head, *args):
        tiles.append(args[1:])  # (first, last) vocabulary columns
        return compute(head, *args)

    monkeypatch.setattr(chunked._Head, "logits", counted)
    return tiles


@pytest.fixture
def held_buffers(monkeypatch):
    """The result of every ``sami_fast.chunked.held_logits`` call (a buffer, or None), in order."""
    from sami_fast import chunked

    kept = []
    allocate = chunked.held_logits

    def recorded(*args):
        kept.append(allocate(*args))
        return kept[-1]

    monkeypatch.setattr(chunked, "held_logits", recorded)
    return kept


class AllocationLog:
    """Tensors made through torch's factories while recording: (dtype, shape) of each, and the
    peak of the bytes alive at once (a tensor's bytes are counted off when it is freed)."""

    FACTORIES = ("empty", "zeros", "empty_like", "zeros_like")

    def __init__(self):
        self.made = []
        self.live_bytes = 0
        self.peak_bytes = 0

    def numels(self, dtype):
        return [torch.Size(shape).numel() for made_dtype, shape in self.made if made_dtype == dtype]

    def _track(self, factory):
        def make(*args, **kwargs):
            tensor = factory(*args, **kwargs)
            size = tensor.numel() * tensor.element_size()
            self.made.append((tensor.dtype, tuple(tensor.shape)))
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(tensor, self._free, size)
            return tensor

        return make

    def _free(self, size):
        self.live_bytes -= size


@pytest.fixture
def allocations():
    """``with allocations() as log:`` records what the block allocates (see AllocationLog)."""

    @contextlib.contextmanager
    def record():
        log = AllocationLog()
        factories = {name: getattr(torch, name) for name in AllocationLog.FACTORIES}
        for name, factory in factories.items():
            setattr(torch, name, log._track(factory))
        try:
            yield log
        finally:
            for name, factory in factories.items():
                setattr(torch, name, factory)

    return record
