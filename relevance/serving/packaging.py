"""A market's merged model as an MLflow pyfunc directory: the models-from-code file
(:mod:`relevance.serving.pyfunc_model`), its config, signature, input example and pinned pip
requirements. Kept apart from the registry so that what a served model *is* reads in one place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from relevance.training.runs import TrainingRun

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")
WEIGHT_SUFFIXES = (".safetensors",)  # the only weights a packaged model holds (merged models are safetensors)


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc, from the installed versions (``torch`` without ``+cpu``)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in _REQUIREMENTS]


def signature():
    """Inputs query, ad_title (ad_description, market optional) → score; params batch_size, precision, bf16, threads."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "query"), ColSpec("string", "ad_title"),
                     ColSpec("string", "ad_description", required=False), ColSpec("string", "market", required=False)])
    params = ParamSchema([ParamSpec("batch_size", "long", 64), ParamSpec("precision", "string", "auto"),
                          ParamSpec("bf16", "boolean", False),
                          ParamSpec("threads", "long", 0)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "score")]), params=params)


def model_config(market: str, run: TrainingRun, batch_size: int = 64, parity: dict | None = None,
                 generic_tokenizer: dict | None = None) -> dict:
    """The pyfunc's ``model_config`` (:mod:`relevance.serving.pyfunc_model`); ``parity`` from
    :mod:`relevance.serving.parity`, ``generic_tokenizer`` from :mod:`relevance.serving.tokenizer_check`."""
    config = {"market": market, "market_token": run.market_token, "max_length": run.max_length,
              "batch_size": batch_size, "method": run.method}
    if parity is not None:
        config["bf16_parity"] = parity
    if generic_tokenizer is not None:
        config["generic_tokenizer"] = generic_tokenizer
    return config


def package_model(merged_dir: Path, out_dir: Path, market: str, run: TrainingRun, batch_size: int = 64,
                  parity: dict | None = None, generic_tokenizer: dict | None = None) -> Path:
    """Save ``merged_dir`` (a transformers directory) as the market's pyfunc model in ``out_dir``."""
    import mlflow
    import pandas as pd

    example = pd.DataFrame({"query": ["apex red bike", "tent"], "ad_title": ["Apex Bike – Red", "Nordic Tent"],
                            "ad_description": ["Free delivery.", None]})
    config = model_config(market, run, batch_size, parity, generic_tokenizer)
    mlflow.pyfunc.save_model(str(out_dir), python_model=str(PYFUNC_FILE), artifacts={"model": str(merged_dir)},
                             model_config=config, signature=signature(), input_example=example,
                             pip_requirements=pip_requirements())
    return out_dir


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The directory a ``file:`` URI or plain path names, when it exists on this machine; else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    path = Path(url2pathname(parsed.path))
    return path if path.is_absolute() and path.is_dir() else None


def stage_local_model(src: Path, dst: Path) -> Path:
    """``dst/<src.name>``: a copy of the model directory ``src`` whose weight files are symbolic links.

    Why: a scoring job stages every market's model before loading it, and copying multilingual-e5-small's
    470 MB of weights took ~1.5 s per market on a 2-core CPU; safetensors only reads (memory-maps) them, so
    a link serves as well. Everything else (code, config, tokenizer) is copied, so nothing that loading
    writes (e.g. Python's bytecode cache) lands in the registry's store. Removing ``dst`` removes the links,
    never the store's files.
    """
    def copy_or_link(source: str, target: str) -> str:
        if source.endswith(WEIGHT_SUFFIXES):
            os.symlink(os.path.abspath(source), target)
            return target
        return shutil.copy2(source, target)

    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(src, dst / src.name, copy_function=copy_or_link, dirs_exist_ok=True))
