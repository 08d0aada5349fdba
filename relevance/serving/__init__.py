"""Shipping models: the MLflow registry, the promotion gate, the pyfunc model, and batch scoring
(the local streaming engine, its input side, and the Spark engine)."""
