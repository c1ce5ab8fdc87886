"""Ranks as local processes: spawn `world` processes joined through a file:// store.

Used by `tp-gdn run` (the default launcher) and by the tests. If a rank fails, the others are
stopped and the caller gets a RuntimeError holding the traceback of every rank that failed, the
earliest first; nothing waits forever.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _entry(rank, world, backend, init_file, out_dir, fn, args):
    from ..parallel import destroy_distributed, init_distributed

    os.environ["LOCAL_RANK"] = str(rank)
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        init_distributed(backend=backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                         timeout_s=300)
        result = fn(*args)
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        destroy_distributed()


def spawn_ranks(world: int, fn, *args, backend: str = "gloo", timeout_s: float = 900, workdir=None) -> list:
    """Run fn(*args) on `world` spawned ranks; return each rank's result. fn must be importable."""
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        init_file = Path(d) / "store"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world, backend, str(init_file), d, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.is_alive() for p in procs):
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        # Every failed rank's traceback, the earliest written first: a rank that fails often
        # makes its peers fail too, and the first one is the likeliest cause.
        errors = sorted(Path(d).glob("rank*.err"), key=lambda f: (f.stat().st_mtime_ns, f.name))
        if errors:
            raise RuntimeError("\n".join(f"{f.stem} failed:\n{f.read_text()}" for f in errors))
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            from ..parallel.watchdog import TIMEOUT_ENV, WATCHDOG_EXIT_CODE

            what = "timed out" if time.monotonic() > deadline else "exited abnormally"
            why = ""
            if any(code == WATCHDOG_EXIT_CODE for _, code in bad):
                why = (f"; exit code {WATCHDOG_EXIT_CODE} is tp_gdn's watchdog: that rank's GPU waited on a peer "
                       f"for {TIMEOUT_ENV} seconds (its message is on stderr)")
            raise RuntimeError(f"ranks {what} (rank, exit code): {bad}{why}")
        return [pickle.loads(Path(d, f"rank{r}.pkl").read_bytes()) for r in range(world)]
