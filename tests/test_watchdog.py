"""The watchdog that ends a process whose GPU waits for ever on a peer (parallel/watchdog.py), on
the CPU: its timing against a clock the test moves, its thread, its setting, and the real end of a
process. The GPU side (the push kernel's and the copy engines' counts, a peer that skips a call)
is in test_gpu_launch.py; the push kernel's count under the interpreter is in test_triton.py."""

import os
import subprocess
import sys
import threading

import pytest

from tp_gdn.parallel import watchdog
from tp_gdn.parallel.watchdog import Progress, Watchdog


def test_it_fires_only_after_the_gpus_count_stood_still_behind_for_the_whole_timeout():
    said = []
    wd = Watchdog(10, on_timeout=said.append, thread=False)
    p = Progress("rank 1's stand-in", pinned=False)
    wd.watch(p)
    assert wd.check(0) is None                 # nothing queued
    p.launched(2)                              # two calls queued, none finished
    assert p.behind() == 2
    assert wd.check(100) is None and wd.check(109.9) is None
    p.word[0] = 1                              # the GPU got through one: the clock starts again
    assert wd.check(109.95) is None and wd.check(119.9) is None
    message = wd.check(119.95)
    assert said == [message]
    assert "rank 1's stand-in" in message and "queued 2 calls" in message and "has finished 1" in message
    assert "TP_GDN_COLLECTIVE_TIMEOUT=10" in message and "exit code 3" in message
    p.word[0] = 2                              # caught up: nothing to say, however long it stays so
    assert wd.check(500) is None and wd.check(10_000) is None and said == [message]


def test_a_gpu_count_ahead_of_the_host_is_caught_up_and_counts_wrap_at_32_bits():
    said = []
    wd = Watchdog(1, on_timeout=said.append, thread=False)
    ahead, wrapped = Progress("ahead", pinned=False), Progress("wrapped", pinned=False)
    wd.watch(ahead)
    wd.watch(wrapped)
    ahead.set_queued(3)
    ahead.word[0] = 5                  # replays of a graph captured elsewhere ran two calls more
    wrapped.set_queued(2 ** 32 + 2)    # the host's count went past 2^32: it reads 2
    wrapped.word[0] = -1               # the GPU's word holds 2^32 - 1: three calls behind
    assert ahead.behind() == 0 and wrapped.behind() == 3
    assert wd.check(0) is None
    assert "wrapped" in wd.check(1) and len(said) == 1


def test_graph_replays_count_what_was_captured_in_them():
    old = watchdog._WATCHDOG
    watchdog._WATCHDOG = Watchdog(5, thread=False)
    try:
        a, b = Progress("a", pinned=False), Progress("b", pinned=False)
        watchdog._WATCHDOG.watch(a)
        watchdog._WATCHDOG.watch(b)
        a.launched(4)                                   # eager calls before
        before = watchdog.captured_counts()
        a.captured += 2                                 # what a capture of two calls of a does
        replay = watchdog.replayed_calls(before, watchdog.captured_counts())
        assert replay == [(a, 2)]
        for _ in range(3):
            watchdog.queue_replayed(replay)
        assert (a.queued, b.queued) == (10, 0)
    finally:
        watchdog._WATCHDOG = old


def test_its_thread_looks_on_its_own():
    fired = threading.Event()
    said = []

    def on_timeout(message):
        said.append(message)
        fired.set()

    wd = Watchdog(0.3, poll_s=0.05, on_timeout=on_timeout)
    stuck, fine = Progress("the stuck one", pinned=False), Progress("the fine one", pinned=False)
    fine.launched(1)
    fine.word[0] = 1
    wd.watch(fine)
    wd.watch(stuck)
    stuck.launched(1)
    assert fired.wait(10)
    assert len(said) == 1 and "the stuck one" in said[0]


@pytest.mark.parametrize("raw,want", [(None, 600.0), ("2.5", 2.5), (" 0 ", 0.0), ("30", 30.0)])
def test_the_timeout_setting_is_read(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("TP_GDN_COLLECTIVE_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("TP_GDN_COLLECTIVE_TIMEOUT", raw)
    assert watchdog.timeout_s() == want


@pytest.mark.parametrize("raw", ["ten", "-1", "inf", "nan"])
def test_a_bad_timeout_setting_is_refused(monkeypatch, raw):
    monkeypatch.setenv("TP_GDN_COLLECTIVE_TIMEOUT", raw)
    with pytest.raises(ValueError, match=f"TP_GDN_COLLECTIVE_TIMEOUT='{raw}': expected a number of seconds >= 0"):
        watchdog.timeout_s()
    with pytest.raises(ValueError, match="TP_GDN_COLLECTIVE_TIMEOUT"):
        watchdog.progress_for("anything")


def test_a_timeout_of_zero_watches_nothing(monkeypatch):
    monkeypatch.setenv("TP_GDN_COLLECTIVE_TIMEOUT", "0")
    assert watchdog.progress_for("anything") is None


def test_a_stuck_count_ends_the_process_with_its_message():
    """The real on_timeout: the message on stderr, then exit code 3, from the watchdog's thread
    while the main thread sleeps (as one blocked in a synchronisation would)."""
    script = (
        "import time\n"
        "from tp_gdn.parallel.watchdog import Progress, Watchdog\n"
        "p = Progress('the stand-in of rank 0', pinned=False)\n"
        "Watchdog(0.5, poll_s=0.05).watch(p)\n"
        "p.launched(1)\n"
        "time.sleep(60)\n"
        "print('the main thread woke up')\n")
    env = dict(os.environ)
    env.pop("TP_GDN_COLLECTIVE_TIMEOUT", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == watchdog.WATCHDOG_EXIT_CODE == 3, done.stderr
    assert "tp_gdn watchdog: the stand-in of rank 0: this rank queued 1 calls" in done.stderr
    assert "ending this process (exit code 3)" in done.stderr
    assert "woke up" not in done.stdout


def test_the_local_launcher_says_when_the_watchdog_ended_a_rank(tmp_path, capfd):
    """Through spawn_ranks (tp-gdn run's default launcher): rank 0 ended by the watchdog's real
    ending; the launcher's error names the watchdog, and the watchdog's message is on stderr."""
    from helpers import run_ranks
    from workers import watchdog_ends_rank0

    with pytest.raises(RuntimeError, match=r"exited abnormally \(rank, exit code\): \[\(0, 3\).*; exit code 3 is "
                                           r"tp_gdn's watchdog: that rank's GPU waited on a peer for "
                                           r"TP_GDN_COLLECTIVE_TIMEOUT seconds \(its message is on stderr\)"):
        run_ranks(2, watchdog_ends_rank0, tmp_path, timeout=60)
    assert "tp_gdn watchdog: rank 0's stand-in: this rank queued 1 calls" in capfd.readouterr().err
