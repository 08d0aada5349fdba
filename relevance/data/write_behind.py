"""Write behind: ingest's Parquet writes run on a second thread while the next batch is validated.

Why: ingest's row rules, hashes and SQLite lookups hold the interpreter, while encoding and compressing
Parquet runs in Arrow's C++ with the GIL released. On one thread they take turns (2M rows on the 2-core
dev VM: 2.0 s of 11.7 s writing); behind on a second thread, the other core does the writing.

Bounded, so memory stays flat whatever the input size: at most ``max_pending`` calls wait (``submit``
blocks beyond that). No error is lost: a failed write is raised in the caller, at a later ``submit``
or at :meth:`WriteBehind.drain`. Reading ahead on a third thread was measured too and left out: it saved
less (0.8 s) and, in large files, held up to three decoded batches (~15 MB each at 45k rows), which showed
in the peak memory (2M rows against 0.5M: 1.10–1.13×).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class WriteBehind:
    """Runs submitted calls one at a time, in submission order, on one background thread.

    Order matters: calls that write the same file must reach it in the order the caller made them.
    ``submit`` returns at once unless ``max_pending`` calls are still waiting; then it waits for the
    oldest (and raises its error, if it failed)."""

    def __init__(self, max_pending: int = 8, name: str = "write-behind"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every submitted call; raise the first failure (the later calls still ran)."""
        first: BaseException | None = None
        while self._pending:
            err = self._pending.popleft().exception()
            first = first or err
        if first is not None:
            raise first

    def close(self) -> None:
        """Stop: calls not started are dropped, a running one finishes; errors are not raised."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class PartitionWriters:
    """One open ParquetWriter per output partition (``market=xx/split=yy/part-00000.parquet``), each
    ``write`` a row group, written on ``behind``'s thread in call order."""

    def __init__(self, root: Path, behind: WriteBehind):
        self.root = root
        self.behind = behind
        self.open: dict[tuple[str, ...], pq.ParquetWriter] = {}  # touched by the writer thread only

    def write(self, parts: tuple[tuple[str, str], ...], table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.replace_schema_metadata(None)  # the same file schema whichever backend wrote it
        self.behind.submit(self._write, tuple(f"{k}={v}" for k, v in parts), table)

    def _write(self, key: tuple[str, ...], table: pa.Table) -> None:
        if key not in self.open:
            folder = self.root.joinpath(*key)
            folder.mkdir(parents=True, exist_ok=True)
            self.open[key] = pq.ParquetWriter(folder / "part-00000.parquet", table.schema)
        self.open[key].write_table(table)

    def close(self) -> None:
        """Close every file; call after ``behind.drain()`` or ``behind.close()``, never beside a write."""
        for w in self.open.values():
            w.close()
        self.open.clear()
