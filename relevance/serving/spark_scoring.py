"""The Spark engine of batch scoring: ``mlflow.pyfunc.spark_udf`` per market, same output contract.

Split of work: the driver streams the input once through the same contract validation as the local
engine (:mod:`relevance.serving.scoring_input`: quarantine, dataset-wide unique ``example_id``) and stages the
valid rows per market; Spark then runs the model — where the time goes — as a pandas UDF over
partitions, one ``spark_udf`` per market (``env_manager="local"``: executors use this environment,
which must hold the model's pip requirements), and writes ``market=xx/part-*.parquet`` with the
columns of :mod:`data_contracts.scores`. The model directory is shipped to executors by MLflow.

Machine notes (DESIGN.md §6): ``SPARK_LOCAL_IP`` defaults to 127.0.0.1 and the driver binds there,
the UI is off, workers use this interpreter; each UDF task gets ``cores / tasks`` torch threads so
``local[2]`` does not oversubscribe two cores. ``resume`` is not offered: a Spark job is rerun whole.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from relevance.serving.registry import DEFAULT_PREFIX
from relevance.serving.scoring_job import ScoringJob
from relevance.serving.scoring_input import PartWriters, ScoringError, process_file

VALID_DIR = "_valid"
VALID_SCHEMA = pa.schema([("example_id", pa.string()), ("query", pa.string()), ("ad_title", pa.string()),
                          ("ad_description", pa.string())])


def spark_session(master: str = "local[2]", app_name: str = "ads-relevance-score"):
    """A SparkSession bound to 127.0.0.1, UTC, microsecond Parquet timestamps, Arrow on, no UI."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).appName(app_name)
             .config("spark.driver.bindAddress", os.environ["SPARK_LOCAL_IP"])
             .config("spark.driver.host", os.environ["SPARK_LOCAL_IP"])
             .config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _cores(master: str) -> int:
    """Concurrent tasks of a ``local[N]`` / ``local[*]`` master (the machine's cores for ``*``), else 1."""
    found = re.fullmatch(r"local\[(\d+|\*)(,\d+)?\]", master)
    if not found:
        return 1
    return (os.cpu_count() or 1) if found.group(1) == "*" else int(found.group(1))


def _stage_valid(job: ScoringJob, window: int) -> None:
    """Validate every input file (driver, streaming) and stage valid rows per market under ``_valid/``."""
    selection = set(job.selection) if job.selection is not None else None
    for f in job.todo():
        writers = PartWriters(job.staging / VALID_DIR, f.index)
        quarantine = PartWriters(job.staging, f.index)

        def on_valid(market: str, rows: pd.DataFrame, writers: PartWriters = writers) -> int:
            frame = rows.reindex(columns=VALID_SCHEMA.names)
            writers.write("scores", market, pa.Table.from_pandas(frame, schema=VALID_SCHEMA, preserve_index=False))
            return len(rows)

        try:
            counts = process_file(job.fs, f, quarantine, job.seen, set(job.models), selection, window, on_valid,
                                  no_model_detail=job.no_model_detail)
        except BaseException:
            writers.abort()
            quarantine.abort()
            raise
        writers.commit()
        quarantine.commit()
        job.commit(f.index, counts)


def _score_market(spark, job: ScoringJob, market: str, model_dir: Path, batch_size: int, precision: str, threads: int) -> int:
    """Score the staged rows of ``market`` with its model through ``spark_udf``; return rows written."""
    import mlflow
    from pyspark.sql import functions as F

    ref = job.models[market]
    src = job.staging / VALID_DIR / f"market={market}"
    out = job.staging / f"market={market}"
    df = spark.read.parquet(str(src))
    df = df.repartition(max(1, spark.sparkContext.defaultParallelism))
    udf = mlflow.pyfunc.spark_udf(spark, str(model_dir), result_type="double", env_manager="local",
                                  params={"batch_size": batch_size, "precision": precision, "threads": threads})
    scored = df.select(
        F.col("example_id"),
        udf(F.struct("query", "ad_title", "ad_description")).alias("score"),
        F.lit(ref.name).alias("model_name"),
        F.lit(ref.version).cast("long").alias("model_version"),
        F.current_timestamp().alias("scored_at"),
    )
    scored.write.mode("overwrite").parquet(str(out))
    return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))


def score_with_spark(source: str, output: str | os.PathLike, *, tracking_uri: str | None = None,
                     alias: str = "champion", markets: Sequence[str] | None = None, resume: bool = False,
                     require_all: bool = False, prefix: str = DEFAULT_PREFIX, batch_size: int = 64,
                     window: int = 4096, precision: str = "auto", spark_master: str = "local[2]",
                     progress: bool = False, **_: Any) -> dict[str, Any]:
    """Score ``source`` into ``output`` on Spark (module docstring); returns the summary.

    As the local engine: markets without a model are quarantined (``status: "partial"``) unless
    ``require_all``, which fails before Spark starts or anything is written.
    """
    if resume:
        raise ScoringError("--resume is offered by the local engine only: rerun the Spark job without it "
                           "(or use --engine local --resume)")
    job = ScoringJob(source, output, engine="spark", alias=alias, markets=markets, require_all=require_all,
                     prefix=prefix, tracking_uri=tracking_uri, resume=False)
    tmp = Path(tempfile.mkdtemp(prefix="ads-relevance-models-"))
    try:
        _stage_valid(job, window)
        expected = {m: n for m in job.models if (n := _staged_rows(job, m))}
        if expected:
            model_dirs = job.download_models(tmp, link_weights=False)  # spark_udf refuses linked weights
            spark = spark_session(spark_master)
            threads = max(1, (os.cpu_count() or 1) // max(1, _cores(spark_master)))
            try:
                for market, n in sorted(expected.items()):
                    written = _score_market(spark, job, market, model_dirs[market], batch_size, precision, threads)
                    if written != n:
                        raise AssertionError(f"Spark wrote {written} scores for market {market}, expected {n}")
            finally:
                spark.stop()
        shutil.rmtree(job.staging / VALID_DIR, ignore_errors=True)
        return job.finish()
    finally:
        job.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _staged_rows(job: ScoringJob, market: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in (job.staging / VALID_DIR / f"market={market}").glob("part-*.parquet"))
