"""revcol-pipeline: everything distributed around the RevCol model (config, data, training, tracking, stages, CLI)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
