"""Tiny in-code transformers models and helpers shared by the adapter tests (no downloads)."""

from __future__ import annotations


import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from relevance.model.adapters import AdapterConfig, AdapterLayer, MTLLoRALinear, adapter_layers, use_tasks

VOCAB = 100


def tiny_bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    return BertForSequenceClassification(cfg).eval()


def tiny_distilbert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64, num_labels=1)
    return DistilBertForSequenceClassification(cfg).eval()


def tiny_xlmr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=1, num_labels=1)
    return XLMRobertaForSequenceClassification(cfg).eval()


ARCHS = {"bert": tiny_bert, "distilbert": tiny_distilbert, "xlm-roberta": tiny_xlmr}


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Make every adapter parameter non-zero and random (B, Λ, w included) so nothing passes by luck."""
    g = torch.Generator().manual_seed(seed)
    layers = [module] if isinstance(module, AdapterLayer) else list(adapter_layers(module).values())
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if name.startswith("base."):
                    continue
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_(noise + (torch.eye(p.shape[0]) if name.startswith("lam.") else 0))


def batch(n: int = 6, length: int = 9, seed: int = 0, token_types: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows (realistic attention masks)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for row in range(0, n, 2):
        mask[row, length - 1 - row % 4:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = (torch.arange(length) >= length // 2).long().expand(n, length).clone()
    return out


def inputs_for(model: nn.Module, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    return batch(n, seed=seed, token_types=model.config.model_type == "bert")


def logits(model: nn.Module, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad(), use_tasks(model, task_ids):
        return model(**inputs).logits


def mtl_layers(model: nn.Module) -> list[MTLLoRALinear]:
    return [m for m in adapter_layers(model).values() if isinstance(m, MTLLoRALinear)]


# per-market LoRA with its shared adapter (AdapterConfig.shared_adapter), a test parameter beside the methods
SHARED_PML = "per-market-lora-shared"


def adapter_config(method: str, markets: tuple[str, ...], **kw: object) -> AdapterConfig:
    """``AdapterConfig(method, markets, **kw)``, where ``SHARED_PML`` is per-market LoRA with its shared adapter."""
    if method == SHARED_PML:
        return AdapterConfig("per-market-lora", markets, shared_adapter=True, **kw)
    return AdapterConfig(method, markets, **kw)
