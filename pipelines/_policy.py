"""Retry policy shared by the flows: transient faults (I/O, network, a locked database) are retried with
a delay, bounded; errors that say the input or the request is wrong are not (retrying a corrupt file only
delays the message the user needs)."""

from __future__ import annotations

PERMANENT = (ValueError, LookupError, FileNotFoundError, KeyError, TypeError)
RETRIES = 2
RETRY_DELAYS = [2, 10]


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the task failed with a permanent error."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception as err:  # noqa: BLE001 - anything else may be transient
        from relevance.data.ingest import IngestError

        return not isinstance(err, IngestError)
    return True


# Results are persisted as JSON, never pickled: a results directory must never be able to run code.
PERSIST = {"persist_result": True, "result_serializer": "json"}


def retrying(**extra):
    """Task options for steps that touch storage or MLflow: bounded retries with delay, JSON results."""
    return {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAYS, "retry_condition_fn": retry_transient,
            **PERSIST, **extra}
