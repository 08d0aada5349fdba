"""MLflow model registry: per-market merged models as pyfunc, aliases, and loading by alias.

A training run (``relevance.training.loop``) holds one adapter for many markets; serving wants one plain model
per market. :func:`register` merges the adapter for each market, packages it as the pyfunc of
:mod:`relevance.serving.pyfunc_model` (signature, input example, explicit pip requirements) and registers it
as ``<prefix>-<market>`` (alias ``candidate`` unless selection across methods sets it). The promotion gate
is :mod:`relevance.serving.promotion`, the per-market choice between methods :mod:`relevance.serving.market_models`;
scoring loads ``<prefix>-<market>@<alias>`` through :func:`load_by_alias`.

**Where the registry is** (nothing is read or created at import): the ``tracking_uri`` argument, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``,
where ``<home>`` is ``ADS_RELEVANCE_HOME`` or ``./mlruns-local``. Everything goes through an explicit
``MlflowClient``: no process-wide tracking URI is ever set.

**Idempotent**: a version is identified by the sha256 of the run's adapter files (tag
``adapter_sha256``); registering the same run again creates no version and re-points ``candidate``
(it only attaches a baseline to a version that was registered without one).

**Baseline** (the promotion gate needs the shared-LoRA AUC): ``baseline_run`` if given, else the run
itself when its method is ``lora``, else the one sibling directory of the run whose ``run_info.json``
says method ``lora`` and the same data fingerprint (several: an error asking for ``--baseline-run``;
none: registered without a baseline, and the gate then refuses unless forced). The baseline's merged
model is logged beside the candidate's (``baseline-<market>``), so the gate can score it on current data.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from data_contracts.markets import is_valid_market, validate_market
from relevance import settings
from relevance.serving.packaging import local_artifact_dir, package_model, stage_local_model
from relevance.serving.parity import measure_merged, parity_tags
from relevance.serving.tokenizer_check import tokenizer_tags
from relevance.training.runs import TrainingRun, find_baseline_run, read_training_run

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "ads-relevance"
CANDIDATE, CHAMPION = "candidate", "champion"
REGISTRY_EXPERIMENT = "ads-relevance-registry"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")


def default_home() -> Path:
    """The embedded registry's directory (see :func:`relevance.settings.home`)."""
    return settings.home()


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<home>/mlflow.db`` (one rule: settings)."""
    return settings.tracking_uri(tracking_uri)


def client_for(tracking_uri: str | None = None):
    """An ``MlflowClient`` for tracking and registry at the resolved URI (a SQLite parent is created)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_name(market: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>-<market>``; both parts are validated (they end up in paths and URIs)."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"model name prefix {prefix!r} is invalid: use letters, digits, '.', '_', '-' "
                         f"(e.g. {DEFAULT_PREFIX!r})")
    return f"{prefix}-{validate_market(market)}"


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def version_by_alias(client, name: str, alias: str):
    """The ``ModelVersion`` that ``name@alias`` points to, or ``None`` (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _missing(err):
            return None
        raise


def markets_with_alias(client, alias: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Sorted markets whose ``<prefix>-<market>`` has ``alias`` (what an unknown-market error lists)."""
    out, token = [], None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{prefix}-%'", page_token=token)
        for rm in page:
            market = rm.name[len(prefix) + 1:]  # LIKE treats '_' as a wildcard: check the prefix exactly
            if rm.name.startswith(f"{prefix}-") and alias in (rm.aliases or {}) and is_valid_market(market):
                out.append(market)
        token = page.token
        if not token:
            return sorted(out)


def all_versions(client, name: str) -> list:
    """Every version of ``name`` (all pages)."""
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


@contextmanager
def _quiet_downloads():
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def download_model(client, artifact_uri: str, dst: str | Path, link_weights: bool = True) -> Path:
    """A logged model (artifact URI of a version's source) staged under ``dst``; returns its directory.

    From a local artifact store (the SQLite default) its weights are linked, not copied, unless
    ``link_weights`` is off (:func:`relevance.serving.packaging.stage_local_model`; Spark's model UDF
    refuses links that leave the model's directory); from any other store MLflow downloads it.
    """
    from mlflow.artifacts import download_artifacts

    local = local_artifact_dir(artifact_uri) if link_weights else None
    if local is not None:
        return stage_local_model(local, Path(dst))
    Path(dst).mkdir(parents=True, exist_ok=True)
    with _quiet_downloads():
        return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=client.tracking_uri))


def load_local(path: str | Path):
    """The :class:`relevance.serving.pyfunc_model.RelevanceModel` of a local pyfunc model directory."""
    import mlflow

    return mlflow.pyfunc.load_model(str(path)).unwrap_python_model()


def load_by_alias(client, market: str, alias: str, dst: str | Path, prefix: str = DEFAULT_PREFIX):
    """``(model, version, local_dir)`` for ``<prefix>-<market>@<alias>``; a missing one names the fix."""
    name = model_name(market, prefix)
    mv = version_by_alias(client, name, alias)
    if mv is None:
        have = markets_with_alias(client, alias, prefix)
        raise LookupError(f"no model {name}@{alias} in {client.tracking_uri}; markets with a {alias!r} model: "
                          f"{have} (register a run with `ads-relevance register`, then `promote`)")
    local = download_model(client, client.get_model_version_download_uri(name, mv.version), dst)
    return load_local(local), mv, local


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=settings.artifact_location(client.tracking_uri))


def _ensure_registered(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Per-market query–ad relevance cross-encoder (ads-relevance).")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _tag_values(tags: dict[str, Any]) -> dict[str, str]:
    return {k: "none" if v is None else str(v) for k, v in tags.items()}


def _run_tags(run: TrainingRun, market: str) -> dict[str, str]:
    """What a version says about where it comes from and how good it was on the run's test split."""
    auc, valid = run.test_auc(market), run.valid_auc(market)
    return _tag_values({
        "market": market, "method": run.method, "training_run_id": run.info.get("mlflow_run_id"),
        "training_run_name": run.info.get("run_name"), "run_dir": str(run.path), "base_model": run.base_model,
        "data_fingerprint": run.info.get("data_fingerprint"), "adapter_sha256": run.adapter_sha256,
        "market_token": str(run.market_token).lower(), "max_length": run.max_length,
        "test_auc": auc.get("auc"), "test_auc_ci_low": auc.get("ci_low"), "test_auc_ci_high": auc.get("ci_high"),
        "test_n": auc.get("n"), "valid_auc": valid.get("auc"), "valid_auc_ci_low": valid.get("ci_low"),
        "valid_auc_ci_high": valid.get("ci_high"), "valid_n": valid.get("n"), "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "added_from": run.info.get("from_run") if market in (run.info.get("added_markets") or ()) else None,
    })


def _baseline_tags(baseline: TrainingRun | None, market: str, uri: str | None) -> dict[str, str]:
    """The shared-LoRA baseline's test AUC and the model the gate scores it with (``none`` when absent)."""
    if baseline is None or uri is None:
        return _tag_values(dict.fromkeys(("baseline_auc", "baseline_auc_ci_low", "baseline_auc_ci_high",
                                          "baseline_model_uri", "baseline_run_dir", "baseline_training_run_id",
                                          "baseline_adapter_sha256")))
    auc = baseline.test_auc(market)
    return _tag_values({"baseline_auc": auc.get("auc"), "baseline_auc_ci_low": auc.get("ci_low"),
                        "baseline_auc_ci_high": auc.get("ci_high"), "baseline_model_uri": uri,
                        "baseline_run_dir": str(baseline.path),
                        "baseline_training_run_id": baseline.info.get("mlflow_run_id"),
                        "baseline_adapter_sha256": baseline.adapter_sha256})


def _merged_models(run: TrainingRun, markets: Sequence[str], work: Path) -> dict[str, Path]:
    """Export each market's merged transformers model of ``run`` under ``work``."""
    from relevance.model.adapters import export_merged, load_adapter
    from relevance.model.adapters.persistence import read_adapter_config
    from relevance.model.cross_encoder import load_cross_encoder

    saved = read_adapter_config(run.path / "adapter")["config"].modules_to_save
    model, tokenizer = load_cross_encoder(run.base_model, "cpu", saved)
    load_adapter(model, run.path / "adapter")
    return {m: export_merged(model, m, work / f"merged-{m}", tokenizer) for m in markets}


def register(run_dir: str | Path, markets: Sequence[str] | None = None, *, tracking_uri: str | None = None,
             prefix: str = DEFAULT_PREFIX, baseline_run: str | Path | None = None,
             experiment: str = REGISTRY_EXPERIMENT, set_candidate: bool = True) -> list[dict[str, Any]]:
    """Register ``run_dir``'s merged model of each market (default: all of the run's, or for a run of
    ``add-market`` only the markets it added, ``run_info["added_markets"]``: the others are unchanged), any method;
    with ``set_candidate`` the ``candidate`` alias points at them (selection across methods sets it
    itself: :mod:`relevance.serving.market_models`).

    Returns one dict per market: market, name, version, method, created (False when the run was
    already registered), valid_auc, test_auc, baseline_auc.
    """
    run = read_training_run(run_dir)
    chosen = run.check_markets(markets if markets is not None else run.info.get("added_markets"))
    baseline = find_baseline_run(run, baseline_run)
    if baseline is None:
        logger.warning("no shared-LoRA baseline for %s: the promotion gate will refuse it unless forced", run.path)
    client = client_for(tracking_uri)
    names = {m: model_name(m, prefix) for m in chosen}
    existing: dict[str, Any] = {}
    for m in chosen:
        _ensure_registered(client, names[m])
        versions = all_versions(client, names[m])
        existing[m] = next((v for v in versions if v.tags.get("adapter_sha256") == run.adapter_sha256), None)
    todo = [m for m in chosen if existing[m] is None]
    # a version registered without a baseline gets one when the run is registered again with it
    fill = {m: existing[m] for m in chosen if existing[m] is not None and baseline is not None
            and m in baseline.markets and existing[m].tags.get("baseline_model_uri", "none") == "none"}
    created: dict[str, Any] = {}
    if todo or fill:
        created = _register_new(client, run, baseline, todo, fill, names, experiment)
    out = []
    for m in chosen:
        mv = existing[m] or created[m]
        if set_candidate:
            client.set_registered_model_alias(names[m], CANDIDATE, mv.version)
        out.append({"market": m, "name": names[m], "version": int(mv.version), "method": run.method,
                    "created": existing[m] is None, "valid_auc": run.valid_auc(m).get("auc"),
                    "test_auc": run.test_auc(m).get("auc"),
                    "baseline_auc": baseline.test_auc(m).get("auc") if baseline else None})
    return out


def _register_new(client, run: TrainingRun, baseline: TrainingRun | None, markets: list[str],
                  fill: dict[str, Any], names: dict[str, str], experiment: str) -> dict[str, Any]:
    """One registration run: merge, package, log and create a version per market of ``markets``;
    attach the baseline to the existing versions in ``fill``."""
    run_tags = {"training_run_id": str(run.info.get("mlflow_run_id")), "run_dir": str(run.path), "method": run.method}
    reg = client.create_run(_experiment_id(client, experiment), run_name=f"register-{run.path.name}", tags=run_tags)
    run_id, artifact_uri = reg.info.run_id, reg.info.artifact_uri
    sources = {**{m: f"{artifact_uri}/model-{m}" for m in markets}, **{m: v.source for m, v in fill.items()}}
    status, out = "FAILED", {}
    try:
        with tempfile.TemporaryDirectory(prefix="ads-relevance-register-") as tmp:
            work = Path(tmp)
            merged = _merged_models(run, markets, work / "run") if markets else {}
            with_base = [m for m in sources if baseline is not None and m in baseline.markets]
            base_uris = _baseline_uris(client, run, baseline, with_base, names, work, run_id, artifact_uri, sources)
            for m in markets:
                parity, tokenizer = measure_merged(merged[m], m, run)
                package_model(merged[m], work / f"model-{m}", m, run, parity=parity,
                              generic_tokenizer=tokenizer["arguments"])
                client.log_artifacts(run_id, str(work / f"model-{m}"), f"model-{m}")
                tags = {**_run_tags(run, m), **_baseline_tags(baseline, m, base_uris.get(m)), **parity_tags(parity),
                        **tokenizer_tags(tokenizer)}
                out[m] = client.create_model_version(names[m], sources[m], run_id=run_id, tags=tags,
                                                     description=f"{run.method} run {run.path.name}, market {m}")
            for m, mv in fill.items():
                for key, value in _baseline_tags(baseline, m, base_uris[m]).items():
                    client.set_model_version_tag(names[m], mv.version, key, value)
            client.log_dict(run_id, {"created": {m: int(v.version) for m, v in out.items()},
                                     "baseline_added": {m: int(v.version) for m, v in fill.items()}},
                            "registered_versions.json")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return out


def _baseline_uris(client, run: TrainingRun, baseline: TrainingRun | None, markets: list[str], names: dict[str, str],
                   work: Path, run_id: str, artifact_uri: str, sources: dict[str, str]) -> dict[str, str]:
    """Artifact URI of each market's baseline model: the candidate itself, an already registered
    version of the baseline run, or a fresh ``baseline-<market>`` artifact of this registration run."""
    if baseline is None or not markets:
        return {}
    if baseline.adapter_sha256 == run.adapter_sha256:
        return {m: sources[m] for m in markets}
    out: dict[str, str] = {}
    for m in markets:  # reuse a copy of this baseline already in the registry: no second upload
        versions = all_versions(client, names[m])
        own = next((v for v in versions if v.tags.get("adapter_sha256") == baseline.adapter_sha256), None)
        logged = [v.tags["baseline_model_uri"] for v in versions
                  if v.tags.get("baseline_adapter_sha256") == baseline.adapter_sha256
                  and v.tags.get("baseline_model_uri", "none") != "none"]
        if own is not None:
            out[m] = client.get_model_version_download_uri(names[m], own.version)
        elif logged:
            out[m] = logged[0]
    fresh = [m for m in markets if m not in out]
    if fresh:
        merged = _merged_models(baseline, fresh, work / "baseline")
        for m in fresh:
            package_model(merged[m], work / f"baseline-{m}", m, baseline)
            client.log_artifacts(run_id, str(work / f"baseline-{m}"), f"baseline-{m}")
            out[m] = f"{artifact_uri}/baseline-{m}"
    return out
