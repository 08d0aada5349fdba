"""Head start: fit the classification head on the frozen encoder's features before fine-tuning.

Why (issue 15): every e5 run starts on a plateau (valid loss ≈ ln 2, scores alike) and leaves it at a
random step; a late exit leaves a market under-trained at the end of the budget (crossing seed 1 in
fp32: valid loss 0.68 at step 100 of 200). Linear probes on the frozen encoder's step-0 features say
the information is there: on the crossing data the first token's last-layer state ranks as well as
mean pooling (valid AUC 0.737 / 0.729 / 0.634 against 0.749 / 0.779 / 0.643; 600 train rows a
market). What is small is the head: a random pooler (e5 ships none) and classifier at std 0.02 read
features that vary by ~0.06, so logits vary by ~0.01 and the gradient into the adapters is the
product of these small factors. Fitting the head first ("linear probing, then fine-tuning", Kumar
et al., ICLR 2022) starts fine-tuning from a head whose logits already separate the labels.

The fit is a linear probe: the first token's hidden state as the head sees it (adapters at B = 0
change nothing yet, so every method sees the same features) on ``rows`` training rows drawn with the
run's seed, through the pooler as it is; the classifier (a linear layer) is an L2-penalised logistic
regression on the standardised features with each row's market prior offset added, as in the training
loss, solved by L-BFGS. The penalty is the one of :data:`PENALTIES` with the best loss on a held-out
fifth of the rows, refitted on all of them, and its logits are shrunk toward their mean by :data:`SHRINK`
(a full-size probe is fragile under the first steps). Fitting the pooler too (384² weights on ~800 rows) by Adam
with early stopping overfit within 60 iterations (held-out AUC 0.65), and an unpenalised classifier
by Adam with early stopping did no better (0.657). A market with a head of its own (method
``separate``) gets a probe of its own, on its rows. The adapters and the run's random streams (data
order, dropout) are untouched.

What the probe is not (measured after the fact, issue 15): a direction that transfers. The held-out fifth is
drawn row by row from the same train rows, so it shares questions and ads with the fit, and its AUC pools the
markets with their priors added: both flatter it. Scored through the model (B = 0), nested seed 0's probe ranks
its own train rows within each market at AUC 0.84 / 0.95 / 0.83 (de / de-broad / es) and the valid rows (other
articles) at 0.47 / 0.44 / 0.55; crossing seed 1's valid rows at 0.49 / 0.47 / 0.51. What it gives fine-tuning
is a head of useful size fitted to the train rows, which helped where runs sat on the plateau (crossing, the
demo) and cost AUC where they did not (nested policies): hence opt-in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from relevance.model.batching import collate, length_sorted_batches
from relevance.model.cross_encoder import task_routing
from relevance.model.precision import autocast

logger = logging.getLogger(__name__)

# L2 strengths tried (on standardised features, with the mean loss per row): the one with the best held-out
# loss refits on every row. On ~800 rows they are sklearn's C ≈ 0.004-0.13, the range in which a probe of
# e5's crossing features ranked best (held-out AUC 0.669-0.701; C = 1: 0.693 with 3x the weights)
PENALTIES = (0.3, 0.1, 0.03, 0.01)
# The fitted head's logits are shrunk toward their mean by this factor before fine-tuning. The probe's weights
# on the pooler's raw outputs (which vary by ~0.02 across rows) are large, so at full size the first Adam
# steps on the pooler and adapters swing the logits: valid loss 0.81-1.11 at step 50 on crossing seeds 1-3,
# above ln 2, and seed 3 lost test macro AUC (0.936 -> 0.921). At 0.2 seed 3's step-50 valid loss was 0.65
# and its test macro 0.927; the crossing clause held in seeds 0-3 (`policy_crossing.md`, label head-start-x0.2).
SHRINK = 0.2
HOLDOUT = 0.2
ALL = "*"  # the key of the head every market shares


@dataclass(frozen=True)
class HeadStart:
    """What one probe did: rows, the L2 strength chosen, held-out loss and AUC before → after, seconds."""

    rows: int
    penalty: float
    loss_before: float
    loss_after: float
    auc_before: float
    auc_after: float
    seconds: float


def head_modules(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(pooler, classifier) of a BERT-style sequence classifier; anything else is a ``ValueError``."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler, classifier = getattr(base, "pooler", None), getattr(model, "classifier", None)
    if pooler is None or not isinstance(getattr(classifier, "shared", classifier), nn.Linear):
        raise ValueError(f"head start needs a BERT-style head (a pooler reading the first token, then a linear "
                         f"classifier); {type(model).__name__} has none: train without --head-start")
    return pooler, classifier


def first_token_features(model: nn.Module, enc: dict, idx: np.ndarray, pad_id: int, device: torch.device,
                         routing: Callable[[np.ndarray], Any], precision: str, batch_size: int = 64) -> torch.Tensor:
    """[n, d] fp32: the first token's last hidden state (the pooler's input) of rows ``idx``, in eval mode.

    ``routing(rows)`` gives the context that routes those rows' task ids (adapters at B = 0 ignore them).
    """
    pooler, _ = head_modules(model)
    captured: list[torch.Tensor] = []
    hook = pooler.register_forward_pre_hook(lambda _m, args: captured.append(args[0][:, 0].float()))
    out = torch.empty(len(idx), model.config.hidden_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for part in length_sorted_batches([len(enc["input_ids"][i]) for i in idx], batch_size):
                rows = idx[part]
                with routing(rows), autocast(precision, device):
                    model(**collate(enc, rows, pad_id, device=device))
                out[torch.as_tensor(part)] = captured.pop().cpu()  # [b, d]
    finally:
        hook.remove()
        model.train(was_training)
    return out


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
    return float(roc_auc_score(y, scores.numpy())) if 0 < y.sum() < len(y) else float("nan")


def _logistic(z: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, penalty: float,
              start: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [d], b): minimise mean BCE(z @ w + b + offsets, y) + penalty/2 · |w|² by L-BFGS (convex)."""
    w, b = (t.detach().clone().requires_grad_(True) for t in start)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b + offsets, y) + 0.5 * penalty * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def probe(pooler: nn.Module, classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor,
          seed: int, penalties: tuple[float, ...] = PENALTIES, shrink: float = SHRINK) -> HeadStart:
    """Fit ``classifier`` (in place) to ``y [n]`` from ``pooler(x [n, d])`` with ``offsets [n]`` added.

    Each penalty is fitted on four fifths of the rows and scored on the rest; the best refits on all
    rows, and its logits are shrunk toward their mean over the rows by ``shrink`` (:data:`SHRINK`; the
    losses reported are the unshrunk fit's). When none beats the head as it is on the held-out rows, the
    head is left bit for bit.
    """
    start = time.perf_counter()
    device = classifier.weight.device
    with torch.no_grad():
        was = pooler.training
        z = pooler.eval()(x.to(device).unsqueeze(1)).float()  # [n, d]: what the classifier reads
        pooler.train(was)
    y, offsets = y.to(device).float(), offsets.to(device).float()
    # standardised features, (z − centre) / scale: the pooler's outputs vary by ~0.02 around a large common
    # part, so raw weights would be badly conditioned; centre and scale fold back into the weights after
    center, scale = z.mean(0), z.std(0).clamp_min(1e-6)  # [d], [d]
    z = (z - center) / scale
    w0 = classifier.weight.detach().float().view(-1) * scale  # [d]: the head as it is, in these units
    b0 = classifier.bias.detach().float().view(()) + classifier.weight.detach().float().view(-1) @ center
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = max(1, int(HOLDOUT * len(y)))
    hold, fit = order[:n_hold], order[n_hold:]

    def held_out(w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:  # (loss, AUC) on the held-out rows
        h = z[hold] @ w + b + offsets[hold]
        return float(nn.functional.binary_cross_entropy_with_logits(h, y[hold])), _auc(h.cpu(), y[hold].cpu())

    before = held_out(w0, b0)
    tried = {p: held_out(*_logistic(z[fit], y[fit], offsets[fit], p, (w0, b0))) for p in penalties}
    penalty = min(tried, key=lambda p: tried[p][0])
    if tried[penalty][0] >= before[0]:  # nothing beat the head as it was: keep it (bit for bit)
        return HeadStart(len(y), 0.0, before[0], before[0], before[1], before[1], time.perf_counter() - start)
    w, b = _logistic(z, y, offsets, penalty, (w0, b0))
    with torch.no_grad():
        weight = shrink * w / scale  # [d]; the features are centred, so the mean logit stays b
        classifier.weight.copy_(weight.view_as(classifier.weight))
        classifier.bias.copy_((b - weight @ center).view_as(classifier.bias))
    return HeadStart(len(y), penalty, before[0], tried[penalty][0], before[1], tried[penalty][1],
                     time.perf_counter() - start)


def fit_heads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor,
              tasks: torch.Tensor | None, seed: int, **kw: Any) -> dict[str, HeadStart]:
    """Probe every head the markets use: the shared one (key ``"*"``), or each market's own copy on its rows."""
    pooler, classifier = head_modules(model)
    copies = getattr(classifier, "copies", {})
    if not copies:
        return {ALL: probe(getattr(pooler, "shared", pooler), getattr(classifier, "shared", classifier),
                           x, y, offsets, seed, **kw)}
    if tasks is None:
        raise ValueError("per-market heads need the rows' task ids")
    out = {}
    for market, task in classifier.copy_tasks.items():
        rows = (tasks == task).nonzero().view(-1)
        own_pooler = pooler.copies[market] if market in getattr(pooler, "copies", {}) else \
            getattr(pooler, "shared", pooler)
        if len(rows) >= 2:
            out[market] = probe(own_pooler, copies[market], x[rows], y[rows], offsets[rows], seed, **kw)
    return out


def start_head(model: nn.Module, enc: dict, labels: torch.Tensor, offsets: torch.Tensor, task_ids: torch.Tensor | None,
               rows: int, seed: int, pad_id: int, device: torch.device, precision: str,
               batch_size: int = 64) -> dict[str, Any]:
    """Probe the head(s) on ``rows`` train rows drawn with ``seed``; what it did, for ``run_info.json``.

    ``{"rows": n, "features_s": s, "shrink": SHRINK, "heads": {"*" or market: HeadStart as a dict}}``;
    logged per head.
    """
    start = time.perf_counter()
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:rows].numpy()

    def routing(part: np.ndarray):
        return task_routing(model, None if task_ids is None else task_ids[part].to(device))

    x = first_token_features(model, enc, idx, pad_id, device, routing, precision, batch_size)
    features_s = time.perf_counter() - start
    fits = fit_heads(model, x, labels[idx], offsets[idx], None if task_ids is None else task_ids[idx], seed)
    for head, fit in fits.items():
        logger.info("head start (%s): probed the classifier on %d train rows (features %.1f s, fit %.1f s); held-out "
                    "loss %.4f -> %.4f, AUC %.3f -> %.3f (L2 %g; 0: kept as it was)",
                    "shared head" if head == ALL else head, fit.rows, features_s, fit.seconds, fit.loss_before,
                    fit.loss_after, fit.auc_before, fit.auc_after, fit.penalty)
    return {"rows": len(idx), "features_s": round(features_s, 3), "shrink": SHRINK,
            "heads": {head: {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(fit).items()}
                      for head, fit in fits.items()}}
