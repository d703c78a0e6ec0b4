"""sparsecode: sparse and discrete codes of neural-network activations (SAEs and VQ codebooks)."""

from . import sae, vq  # noqa: F401  (the methods: each module registers one; the seam lists none)
from .code import Code, decode
from .coder import Coder, CoderConfig, Output, build, get_method, methods, register
from .errors import SparsecodeError
from .evaluate import evaluate
from .interop import load_coder
from .train import TrainConfig, Trainer, train

__all__ = ["Code", "Coder", "CoderConfig", "Output", "SparsecodeError", "TrainConfig", "Trainer", "build",
           "decode", "evaluate", "get_method", "load_coder", "methods", "register", "train"]
__version__ = "0.1.0"
