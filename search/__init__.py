"""rare-species-search: Optuna hyperparameter search for Keras 3 classifiers of rare species."""

__version__ = "0.1.0"
