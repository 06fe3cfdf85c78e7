"""clse-fx: CLSE visual-token pruning as a graph compiler for multimodal LLMs."""

__version__ = "0.1.0"
