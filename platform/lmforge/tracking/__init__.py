"""MLflow tracking and the model registry: where runs, metrics and model versions live."""
