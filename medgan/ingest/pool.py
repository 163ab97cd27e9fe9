"""The ingest's process pool: started on first use, workers that exit when the parent dies, largest work first."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from medgan.ingest.worker import Task, run_task


class Workers:
    """The ingest's process pool, started on first use (so a run that needs none forks nothing). Leaving the block
    with an error cancels what has not started."""

    def __init__(self, n: int):
        self.n = n
        self._pool: ProcessPoolExecutor | None = None

    def reset(self) -> None:
        """Drop the pool (one whose worker died: the next `get` starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def release(self) -> None:
        """No more work: the workers exit while the parent goes on (writing the tables), not after it."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            # fork starts workers without re-importing torch (seconds each); workers run torch single-threaded, so no
            # OpenMP pool is used after the fork. Elsewhere (macOS, Windows) spawn is the safe default.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(
                self.n, mp_context=mp.get_context(method), initializer=_worker_init, initargs=(os.getpid(),)
            )
        return self._pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)


def largest_first(tasks: list[Task]) -> list[Task]:
    """The pool's submission order: largest sources first (manifest order among equals), so a run does not end with
    one worker busy on a big volume while the others wait. Parts are still assembled in manifest order."""
    return sorted(tasks, key=lambda t: -t.size)


def _worker_init(parent: int) -> None:
    import threading

    import torch

    # One process per core: intra-op threads would only oversubscribe.
    torch.set_num_threads(1)

    # A worker whose parent died (kill -9 leaves no chance to stop the pool) exits instead of reading and writing on.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medgan-parent-watch").start()


def execute(tasks: list[Task], pool: Workers, progress: bool, on_done: Callable[[Task, dict], None]) -> None:
    """Run pending tasks (in-process for one worker or one task, else on the pool) with a progress bar; `on_done`
    gets each task's summary as it finishes (in the parent process)."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="item", disable=not progress, desc="ingest", dynamic_ncols=True)
    n_slices, t0 = 0, time.perf_counter()

    def done(task: Task, res: dict) -> None:
        nonlocal n_slices
        n_slices += res["n_slices"]
        bar.update(1)
        bar.set_postfix_str(f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f} slices/s")
        on_done(task, res)

    try:
        if pool.n <= 1 or len(tasks) <= 1:
            for t in tasks:
                done(t, run_task(t))
            return
        futures = {pool.get().submit(run_task, t): t for t in largest_first(tasks)}
        pending, broken = set(futures), []
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    done(futures[f], f.result())
                except BrokenProcessPool:  # a worker died (a decoder crash, the OOM killer): which task is unknown
                    broken.append(futures[f])
                except Exception as e:
                    done(futures[f], _failed(e))
        # Each task the dead worker took down with it runs again alone, so one bad source only fails itself.
        pool.reset()
        for t in broken:
            alone = Workers(1)
            try:
                done(t, alone.get().submit(run_task, t).result())
            except Exception as e:
                done(t, _failed(e, crashed=isinstance(e, BrokenProcessPool)))
            finally:
                alone.reset()
    finally:
        bar.close()


def _failed(e: BaseException, crashed: bool = False) -> dict:
    """The summary of a task whose worker raised (or died: `crashed`); its sources are reported, no part written."""
    what = (
        "the worker reading it died (a crash in a decoder, or out of memory)" if crashed else f"{type(e).__name__}: {e}"
    )
    return {"failed": f"worker failed: {what}".replace("\n", " ")[:300], "n_slices": 0}
