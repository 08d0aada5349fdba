"""Prefect on its ephemeral API, in a private PREFECT_HOME, for the whole pipelines test session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from relevance.model.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    from relevance.data.demo_data import write_demo_data

    raw = tmp_path_factory.mktemp("demo") / "raw"
    write_demo_data(raw, markets="us,de,fr", rows_per_market=300, seed=0, corrupt_fraction=0.02)
    return str(raw)


@pytest.fixture(scope="session")
def read_artifacts():
    """``read_artifacts(keys)``: the Prefect artifacts with those keys, read through the API client."""
    import asyncio

    def read(keys):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async def fetch():
            async with get_client() as client:
                return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))

        return asyncio.run(fetch())

    return read
