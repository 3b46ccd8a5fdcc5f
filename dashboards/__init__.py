"""Views of tracked runs: the model-zoo table, sweep plots, the MLflow UI launcher."""
