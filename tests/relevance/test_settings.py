from relevance import settings


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ADS_RELEVANCE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert settings.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns-local' / 'mlflow.db'}"
    assert settings.tracking_uri(workdir=tmp_path / "w") == f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    monkeypatch.setenv("ADS_RELEVANCE_HOME", str(tmp_path / "home"))
    assert settings.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert settings.tracking_uri() == "http://127.0.0.1:5000"
    assert settings.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_artifact_location_beside_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    assert settings.artifact_location("http://127.0.0.1:5000") is None
