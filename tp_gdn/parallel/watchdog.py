"""Turns a hang in tp_gdn's own cross-GPU waits into an error that ends the process.

Two of the layer's all-reduces wait for their peers on the GPU with no timeout: the decode
all-reduce's kernels (kernels/triton_allreduce.py) spin on flags or words their peers write, and
the copy engines' (comm.CopyEngineAllReduce) wait with stream memory operations. Neither is NCCL,
whose collectives torch's own watchdog covers. A rank whose peer never reaches the same call (the
peer raised before it, exited, or runs another sequence of calls) would wait for ever, and so would
a host thread that synchronises with that GPU.

Each such all-reduce keeps a `Progress`: how many calls this rank has queued, counted on the
host, and how many of them its GPU has got through, which the GPU writes into pinned host memory
(the all-reduce kernel once past its wait, a stream write after each copy-engine call). A daemon
thread reads both every poll. Where the GPU's count stands still below the host's for
TP_GDN_COLLECTIVE_TIMEOUT seconds (default 600, as torch's NCCL groups; 0 turns the watchdog
off, and with it the GPU's writes), the thread writes what is stuck to stderr and ends the
process with exit code WATCHDOG_EXIT_CODE: no host call can release a waiting stream or kernel,
and a process exit frees the GPU (torchrun then ends the other ranks). The thread makes no CUDA
call, it reads host memory only, so it never disturbs a CUDA graph capture on another thread.
The host counts a call after queuing it, so the GPU's count can be ahead for a moment but the
host's is never above the calls really queued: a slow GPU is never taken for a stuck one.

A replay of a CUDA graph runs the calls captured in it: GraphedDecoder counts them per replay
(`captured_counts`, `queue_replayed`). Graphs captured and replayed elsewhere are not counted:
their calls put the GPU's count ahead of the host's, which the watchdog reads as caught up, so
from then on it can miss a hang of that all-reduce.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref

import torch

TIMEOUT_ENV = "TP_GDN_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
WATCHDOG_EXIT_CODE = 3
_MASK = 0xFFFFFFFF
_WORDS: list[torch.Tensor] = []


def timeout_s() -> float:
    """TP_GDN_COLLECTIVE_TIMEOUT in seconds (0: no watchdog), read now."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0 (0 turns the watchdog off)")
    return value


class Progress:
    """Calls of one all-reduce that this rank queued on its GPU, against those the GPU finished.

    The GPU writes the number of calls it has finished (mod 2^32) into the uint32 at `address`
    (pinned host memory, which the GPU reaches by the same address; plain host memory where
    there is no GPU, for tests). The host keeps `queued`, the calls it queued (mod 2^32)."""

    def __init__(self, what: str, pinned: bool | None = None):
        self.what = what
        pinned = torch.cuda.is_available() if pinned is None else pinned
        self._cuda = pinned
        self.word = torch.zeros(1, dtype=torch.int32, pin_memory=pinned)
        # kept for the process's life: a GPU write still in flight when this Progress goes must
        # not land in pinned memory that torch's host allocator has handed out again
        _WORDS.append(self.word)
        self.address = self.word.data_ptr()
        self._finished = ctypes.c_uint32.from_address(self.address)    # read afresh each time
        self.queued = 0
        self.captured = 0        # calls captured into CUDA graphs (they run on replay)
        self._since = self._last = None     # the watchdog's: when it first saw `finished` at _last, behind

    @property
    def finished(self) -> int:
        return self._finished.value

    def behind(self) -> int:
        """Calls queued and not yet finished (0 where the GPU's count is at or ahead of the host's)."""
        d = (self.queued - self.finished) & _MASK
        return d if d < 1 << 31 else 0

    def launched(self, n: int = 1) -> None:
        """n calls were just queued on the current stream, or captured where it is capturing."""
        if self._cuda and torch.cuda.is_current_stream_capturing():
            self.captured += n
        else:
            self.queued = (self.queued + n) & _MASK

    def set_queued(self, count: int) -> None:
        """The host has queued `count` calls in all (a caller that numbers its calls)."""
        self.queued = count & _MASK


class Watchdog:
    """Checks every watched Progress each `poll_s` (a daemon thread, started with the first
    watch); `check(now)` is one such look, and calls on_timeout(message) for the first Progress
    whose GPU count has stood still below its host count for timeout_s. The default on_timeout
    writes the message to stderr and ends the process (WATCHDOG_EXIT_CODE)."""

    def __init__(self, timeout_s: float, poll_s: float | None = None, on_timeout=None, thread: bool = True):
        if not timeout_s > 0:
            raise ValueError(f"a watchdog needs a timeout > 0 s, got {timeout_s}")
        self._poll_s = poll_s
        self.set_timeout(timeout_s)
        self.on_timeout = on_timeout or _end_process
        self._watched: list[weakref.ref] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_thread = thread     # False: nothing looks but check() (tests)

    def set_timeout(self, timeout_s: float) -> None:
        """Takes effect at the next look (a process whose TP_GDN_COLLECTIVE_TIMEOUT changed)."""
        self.timeout_s = timeout_s
        self.poll_s = self._poll_s if self._poll_s is not None else min(1.0, timeout_s / 10)

    def watch(self, progress: Progress) -> None:
        with self._lock:
            self._watched.append(weakref.ref(progress))
            if self._thread is None and self._start_thread:
                self._thread = threading.Thread(target=self._run, name="tp_gdn-watchdog", daemon=True)
                self._thread.start()

    def watched(self) -> list[Progress]:
        with self._lock:
            alive = [(r, r()) for r in self._watched]
            self._watched = [r for r, p in alive if p is not None]
            return [p for _, p in alive if p is not None]

    def check(self, now: float) -> str | None:
        """One look at every watched Progress; the message passed to on_timeout, or None."""
        for p in self.watched():
            if p.behind() == 0:
                p._since = p._last = None
                continue
            finished = p.finished
            if p._since is None or finished != p._last:
                p._since, p._last = now, finished
            elif now - p._since >= self.timeout_s:
                message = (
                    f"tp_gdn watchdog: {p.what}: this rank queued {p.queued} calls (mod 2^32) and its GPU "
                    f"has finished {finished}, none more for {now - p._since:.0f} s ({TIMEOUT_ENV}="
                    f"{self.timeout_s:g}). A peer rank did not reach the same call: it raised before it, "
                    f"exited, or ran another sequence of calls. The GPU's wait cannot be released from the "
                    f"host; ending this process (exit code {WATCHDOG_EXIT_CODE}).")
                self.on_timeout(message)
                return message
        return None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            if self.check(time.monotonic()) is not None:
                return


def _end_process(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(WATCHDOG_EXIT_CODE)


_WATCHDOG: Watchdog | None = None


def progress_for(what: str) -> Progress | None:
    """A Progress watched by the process's watchdog (started here the first time), or None where
    TP_GDN_COLLECTIVE_TIMEOUT is 0: then the caller has the GPU write nothing."""
    global _WATCHDOG
    limit = timeout_s()
    if limit == 0:
        return None
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(limit)
    elif _WATCHDOG.timeout_s != limit:
        _WATCHDOG.set_timeout(limit)
    p = Progress(what)
    _WATCHDOG.watch(p)
    return p


def captured_counts() -> dict[int, tuple[Progress, int]]:
    """{id: (Progress, calls captured so far)} of every watched Progress: taken before and after
    a capture, the difference is what one replay of the graph runs."""
    if _WATCHDOG is None:
        return {}
    return {id(p): (p, p.captured) for p in _WATCHDOG.watched()}


def replayed_calls(before: dict, after: dict) -> list[tuple[Progress, int]]:
    """[(Progress, calls one replay runs)] from captured_counts before and after a capture."""
    return [(p, n - before.get(k, (p, 0))[1]) for k, (p, n) in after.items() if n != before.get(k, (p, 0))[1]]


def queue_replayed(calls: list[tuple[Progress, int]]) -> None:
    """Count one replay's calls as queued (replayed_calls)."""
    for p, n in calls:
        p.set_queued(p.queued + n)
