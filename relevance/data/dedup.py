"""Dataset-wide "have we seen this example_id?" with bounded memory.

Ingest streams record batches, but ``example_id`` must be unique across the whole dataset. Keeping every
id in a Python set would make memory grow with the input (≈100 bytes per id); instead the ids live in an
on-disk SQLite table with a primary-key index, whose page cache is capped, so memory stays flat while
the disk file grows (and is deleted when ingest ends).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path


class SeenIds:
    """``first_occurrence(ids)`` → one bool per id: True the first time an id is seen, in call order."""

    def __init__(self, path: Path, cache_kib: int = 16_384):
        self._db = sqlite3.connect(str(path))
        self._db.executescript(
            f"""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-{int(cache_kib)};
            PRAGMA temp_store=FILE;
            CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TEMP TABLE batch (pos INTEGER PRIMARY KEY, id TEXT NOT NULL);
            """
        )

    def first_occurrence(self, ids: Sequence[str]) -> list[bool]:
        if not ids:
            return []
        db = self._db
        db.execute("DELETE FROM batch")
        db.executemany("INSERT INTO batch(pos, id) VALUES (?, ?)", enumerate(ids))
        # a row is first if its id is not in `seen` and no earlier row of this batch has it
        firsts = {
            pos
            for (pos,) in db.execute(
                "SELECT MIN(pos) FROM batch WHERE id NOT IN (SELECT id FROM seen) GROUP BY id"
            )
        }
        db.execute("INSERT INTO seen(id) SELECT DISTINCT id FROM batch WHERE true ON CONFLICT DO NOTHING")
        db.commit()
        return [i in firsts for i in range(len(ids))]

    def close(self) -> None:
        self._db.close()
