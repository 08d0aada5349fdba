"""`ads-relevance register | select | promote`: the registry and the promotion gate as typer commands.

``register`` puts one run's merged per-market models in the registry; ``select`` registers every
method's run and gives each market the model its valid-split evidence supports (the pipeline's step);
``promote`` runs the gate on one market's ``candidate``. Exit status: 0 when every market decided has a
champion, 3 when some market is left without a model or its decision failed (named in the output), 2
on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from relevance.cli.common import Prefix, TrackingUri, cli_errors, fail, market_list, quiet_libraries

UNSERVED_EXIT = 3
_DECISIONS_HELP = "Where decision JSONs go. Default: $ADS_RELEVANCE_HOME/promotions (./mlruns-local/promotions)."


def _auc(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "  n/a "


def register_command(
    run: Annotated[Path, typer.Option(
        help="Training run directory (the --out of `train`): adapter/, run_info.json, metrics.json.")],
    markets: Annotated[Optional[str], typer.Option(
        help="Comma-separated markets to register. Default: every market of the run.")] = None,
    baseline_run: Annotated[Optional[Path], typer.Option(
        help=(
            "The shared-LoRA (method lora) run the gate compares with. Default: the run itself if it "
            "is lora, else the one lora sibling of RUN with the same data fingerprint."
        ))] = None,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge the run's adapter per market (any method) and register each as <prefix>-<market>, alias `candidate`.

    Idempotent: registering the same run again creates no new version (it re-points `candidate`).
    """
    quiet_libraries()
    from relevance.serving.registry import register

    try:
        rows = register(run, market_list(markets), tracking_uri=tracking_uri, prefix=prefix, baseline_run=baseline_run)
    except cli_errors() as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'model':<28}{'version':>8}{'method':>20}{'new':>6}{'valid AUC':>10}{'test AUC':>10}{'baseline':>10}")
    for r in rows:
        typer.echo(f"{r['name']:<28}{r['version']:>8}{r['method']:>20}{'yes' if r['created'] else 'no':>6}"
                   f"{_auc(r['valid_auc']):>10}{_auc(r['test_auc']):>10}{_auc(r['baseline_auc']):>10}")


def promote_command(
    data: Annotated[Path, typer.Option(
        help="Curated dataset (ingest output): every model is scored on its current valid split.")],
    market: Annotated[Optional[str], typer.Option(help="The market whose candidate to promote.")] = None,
    all_markets: Annotated[bool, typer.Option("--all", help="Every market that has a candidate.")] = False,
    tolerance: Annotated[float, typer.Option(
        help="Candidate valid AUC may trail the champion's and shared LoRA's by at most this much.")] = 0.002,
    force: Annotated[bool, typer.Option(
        help="Promote even if the gate refuses (needs --reason; recorded on the version).")] = False,
    reason: Annotated[Optional[str], typer.Option(help="Why --force overrides the gate.")] = None,
    report_dir: Annotated[Optional[Path], typer.Option(help=_DECISIONS_HELP)] = None,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
) -> None:
    """Promotion gate: `candidate` becomes `champion` only if, on the current valid data (scored now, 95%
    cluster bootstrap over query_id), its AUC is above the sanity floor, >= the champion's - tolerance
    and >= the shared-LoRA baseline's - tolerance. Test AUC is reported, not used. Decisions and reasons
    go to version tags and a JSON file. Exit 3 when a market is left without a champion.
    """
    quiet_libraries()
    from relevance.serving.promotion import GateBusy, promote, promote_all

    if all_markets == (market is not None):
        fail(ValueError("pass exactly one of --market M or --all"))
    options = {"tracking_uri": tracking_uri, "prefix": prefix, "tolerance": tolerance, "force": force,
               "reason": reason, "report_dir": report_dir}
    try:
        decisions = promote_all(data, **options) if all_markets else [promote(market, data, **options)]  # type: ignore[arg-type]
    except (*cli_errors(), GateBusy) as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(decisions, indent=2, default=str))
    else:
        print_decisions(decisions)
    _exit_if_unserved(decisions)


def select_command(
    data: Annotated[Path, typer.Option(
        help="Curated dataset (ingest output) the runs were trained on: valid rows choose, test rows are reported.")],
    run: Annotated[list[Path], typer.Option(
        "--run", help="A training run directory; repeat for every method (include the shared-LoRA `lora` run).")],
    tolerance: Annotated[float, typer.Option(
        help="The chosen model's valid AUC may trail the champion's and shared LoRA's by at most this much.")] = 0.002,
    floor: Annotated[float, typer.Option(
        help=("Sanity floor: a model whose valid AUC is at or below it, or whose valid predictions are degenerate, "
              "is never shipped. 0 switches these checks off (smoke tests only)."))] = 0.55,
    report_dir: Annotated[Optional[Path], typer.Option(help=_DECISIONS_HELP)] = None,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print registrations and decisions as JSON.")] = False,
) -> None:
    """Register every run's merged per-market models, then give each market the model its evidence supports.

    Per market: the best valid AUC among the runs' models, unless its edge over the simpler choice (the
    champion, else shared LoRA) is inside the paired valid interval; then the gate (sanity floor,
    champion and shared LoRA - tolerance) and `champion`. Exit 3 when a market is left without a model.
    """
    quiet_libraries()
    from relevance.serving.market_models import select_models

    try:
        out = select_models(run, data, tracking_uri=tracking_uri, prefix=prefix, tolerance=tolerance, floor=floor,
                            report_dir=report_dir)
    except cli_errors() as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        print_decisions(out["decisions"])
    _exit_if_unserved(out["decisions"])


def print_decisions(decisions: list[dict[str, Any]]) -> None:
    """One block per market: decision, chosen version and method, valid/test AUC, reasons."""
    for d in decisions:
        cand = (d.get("auc") or {}).get("candidate") or {}
        chosen = f"v{d['candidate_version']} ({d.get('candidate_method')})" if d.get("candidate_version") else "none"
        champion = f"v{d['champion_after']}" if d.get("champion_after") else "NONE"
        typer.echo(f"{d['name']}: {d['decision'].upper()} candidate {chosen}, champion {champion}; valid AUC "
                   f"{_auc((cand.get('valid') or {}).get('auc'))}, test AUC {_auc((cand.get('test') or {}).get('auc'))}")
        for r in d.get("reasons", []):
            typer.echo(f"  - {r}")
        if d.get("report"):
            typer.echo(f"  decision: {d['report']}")


def _exit_if_unserved(decisions: list[dict[str, Any]]) -> None:
    from relevance.pipeline_plan import unserved_markets

    dark = unserved_markets(decisions)
    if dark:
        typer.secho(f"error: no model serves market(s) {dark}: see the reasons above", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=UNSERVED_EXIT)
