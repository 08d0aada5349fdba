"""`ads-relevance …`: the typer app (`app.py`) and one module per command group (`train.py`,
`serving.py`). The only part of `relevance` that may start a Prefect flow, and only lazily."""
