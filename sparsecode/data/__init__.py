"""Where activations come from. This package lists every kind of source: importing it registers them all
(synthetic ground truth, clusters, hierarchical, .npy arrays, harvested stores, a model on the fly)."""

from . import hierarchical, store, stream, synthetic  # noqa: F401  (the source kinds, registered on import)
from .source import ActivationSource, SourceConfig, TensorSource, open_source, register_source, source_kinds

__all__ = ["ActivationSource", "SourceConfig", "TensorSource", "open_source", "register_source", "source_kinds"]
