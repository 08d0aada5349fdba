"""Tests for relevance.training.head_start: the features are what the pooler reads, the fit lowers the held-out
loss and keeps its best weights, per-market head copies follow, and a run with a head start records it and
leaves the adapters, the data order and the dropout stream as they were."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from relevance.training.head_start import first_token_features, fit_heads, head_modules, probe
from relevance.training.loop import Run, TrainConfig
from relevance.training.distributed import Dist


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("head_start")
    write_demo_data(root / "raw", "de,fr,us", rows_per_market=160, seed=3)
    ingest(str(root / "raw"), root / "ds", progress=False)
    build_tiny_model(root / "tiny", hidden=32, layers=1, heads=2, seed=0)
    return {"data": root / "ds", "model": root / "tiny"}


def _config(env: dict[str, Path], out: Path, **kw) -> TrainConfig:
    base = dict(data=str(env["data"]), method="mtl-lora", base_model=str(env["model"]), out=str(out),
                max_steps=4, eval_every=4, batch_size=16, learning_rate=3e-3, track=False, progress=False,
                modules_to_save=("classifier", "pooler"))
    return TrainConfig(**{**base, **kw})


class FirstToken(torch.nn.Module):  # what a BERT pooler reads, without the dense layer
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]


def _run(config: TrainConfig) -> Run:
    return Run(config, Dist(rank=0, world=1, device=torch.device("cpu"), owns_group=False))


def test_features_are_the_first_token_state_the_pooler_reads(env, tmp_path: Path) -> None:
    run = _run(_config(env, tmp_path / "run"))
    idx = np.array([5, 0, 17, 3, 11])
    from relevance.model.batching import collate
    from relevance.model.cross_encoder import task_routing

    def routing(rows):
        return task_routing(run.model, run.task_ids[rows])

    x = first_token_features(run.model, run.enc, idx, 0, torch.device("cpu"), routing, "fp32", batch_size=2)
    run.model.eval()
    with torch.no_grad():
        for j, i in enumerate(idx):  # one row at a time: no padding, no sorting
            with routing([i]):
                out = run.model(**collate(run.enc, [i], 0), output_hidden_states=True)
            torch.testing.assert_close(x[j], out.hidden_states[-1][0, 0])
    assert run.model.training is False  # the caller's mode is kept (eval here)


def test_fit_lowers_the_held_out_loss_and_keeps_the_best_weights() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1))
    d, n = 16, 400
    direction = torch.randn(d)
    x = torch.randn(n, d) * 0.05 + torch.randn(d)  # a large common part, small variation, like e5's [CLS]
    y = (x @ direction + 0.02 * torch.randn(n) > (x @ direction).median()).float()
    offsets = torch.full((n,), 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_heads(model, x, y, offsets, None, seed=0)["*"]
    assert fit.loss_after < fit.loss_before - 0.2 and fit.auc_after > 0.9 > fit.auc_before
    assert fit.penalty in (0.3, 0.1, 0.03, 0.01)
    after = model.state_dict()
    assert {k for k in after if not torch.equal(after[k], before[k])} == {"classifier.weight", "classifier.bias"}
    # the model's own head now separates fresh rows of the same kind
    x2 = torch.randn(n, d) * 0.05 + x.mean(0)  # the same common part, fresh variation
    y2 = (x2 @ direction > (x @ direction).median()).float()
    with torch.no_grad():
        z = model.classifier(model.bert.pooler(x2.unsqueeze(1))).view(-1)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y2.numpy(), z.numpy()) > 0.9


def test_the_fitted_logits_are_shrunk_toward_their_mean() -> None:
    """The same fit at shrink 1 and at the default: same mean logit over the rows, deviations × SHRINK."""
    from relevance.training.head_start import SHRINK

    torch.manual_seed(4)
    x = torch.randn(300, 6) * 0.03 + torch.randn(6)
    y = (x[:, 0] + 0.01 * torch.randn(300) > x[:, 0].median()).float()
    heads = [torch.nn.Linear(6, 1) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    full = probe(FirstToken(), heads[0], x, y, torch.zeros(300), seed=0, shrink=1.0)
    shrunk = probe(FirstToken(), heads[1], x, y, torch.zeros(300), seed=0)
    assert full == dataclasses.replace(shrunk, seconds=full.seconds) and full.penalty > 0
    with torch.no_grad():
        a, b = (h(x).view(-1).double() for h in heads)
    assert 0 < SHRINK < 1 and abs(float(a.mean() - b.mean())) < 1e-4
    torch.testing.assert_close(b - b.mean(), SHRINK * (a - a.mean()), atol=1e-4, rtol=1e-4)


def test_a_probe_that_cannot_beat_the_head_leaves_it_bit_for_bit() -> None:
    torch.manual_seed(1)
    pooler, classifier = FirstToken(), torch.nn.Linear(8, 1)
    before = [p.clone() for p in classifier.parameters()]
    x, y = torch.randn(200, 8), (torch.rand(200) < 0.5).float()  # labels independent of the features
    fit = probe(pooler, classifier, x, y, torch.zeros(200), seed=0, penalties=(1e-6,))
    if fit.penalty == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(before, classifier.parameters()))
        assert fit.loss_after == fit.loss_before
    else:  # a lucky split: the fit must then really have been better on the held-out rows
        assert fit.loss_after < fit.loss_before


def test_each_market_with_a_head_of_its_own_gets_a_probe_on_its_own_rows(env, tmp_path: Path) -> None:
    """Method ``separate``: de's labels are the reverse of fr's; each market's classifier learns its own."""
    from sklearn.metrics import roc_auc_score

    run = _run(_config(env, tmp_path / "sep", method="separate"))
    pooler, classifier = head_modules(run.model)
    shared = {k: v.clone() for k, v in classifier.shared.state_dict().items()}
    torch.manual_seed(2)
    n, d = 600, run.model.config.hidden_size
    x, tasks, direction = torch.randn(n, 1, d), torch.randint(0, 3, (n,)), torch.randn(d)
    sign = torch.tensor([1.0, -1.0, 1.0])[tasks]  # task order de, fr, us
    y = ((x[:, 0] @ direction) * sign > 0).float()
    fits = fit_heads(run.model, x[:, 0], y, torch.zeros(n), tasks, seed=0)
    assert sorted(fits) == ["de", "fr", "us"] and sum(f.rows for f in fits.values()) == n
    with torch.no_grad():
        for market, task in classifier.copy_tasks.items():
            rows = tasks == task
            z = classifier.copies[market](pooler.copies[market](x[rows])).view(-1)
            assert roc_auc_score(y[rows].numpy(), z.numpy()) > 0.9, market
    assert all(torch.equal(v, classifier.shared.state_dict()[k]) for k, v in shared.items())


def test_a_run_with_a_head_start_changes_only_the_head_and_records_it(env, tmp_path: Path) -> None:
    plain = _run(_config(env, tmp_path / "a"))
    plain_stream = torch.rand(4)  # the dropout stream, seeded at the end of setup
    started = _run(_config(env, tmp_path / "b", head_start=1000))
    assert torch.equal(torch.rand(4), plain_stream)
    assert plain.head_start is None
    fit = started.head_start["heads"]["*"]
    assert started.head_start["rows"] == fit["rows"] == len(started.labels) and started.head_start["features_s"] > 0
    assert fit["rows"] == len(started.labels) and fit["loss_after"] <= fit["loss_before"]
    a, b = plain.model.state_dict(), started.model.state_dict()
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ == {"classifier.weight", "classifier.bias"}
    assert [plain.sampler.next_batch().tolist() for _ in range(3)] == [started.sampler.next_batch().tolist()
                                                                        for _ in range(3)]
    result = started.fit(None)
    assert result.run_info["head_start"] == started.head_start


def test_a_head_without_a_pooler_is_a_clear_error() -> None:
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="BERT-style head"):
        head_modules(model)


def test_a_resumed_run_does_not_refit_and_still_reports_the_head_start(env, tmp_path: Path, monkeypatch) -> None:
    from relevance.training import loop
    from relevance.training.loop import train

    config = _config(env, tmp_path / "r", head_start=1000)
    first = train(config).run_info["head_start"]
    assert first["heads"]["*"]["rows"] > 0
    monkeypatch.setattr(loop, "start_head", lambda *a, **k: pytest.fail("a resumed run fitted the head again"))
    resumed = _run(_config(env, tmp_path / "r", head_start=1000, resume=True))
    assert resumed.head_start == first
