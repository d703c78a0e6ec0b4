"""Where activations come from: synthetic ground truth, arrays on disk, (later) model harvests."""

from .source import ActivationSource, SourceConfig, TensorSource, open_source, register_source

__all__ = ["ActivationSource", "SourceConfig", "TensorSource", "open_source", "register_source"]
