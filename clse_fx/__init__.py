"""clse-fx: CLSE visual-token pruning as a graph compiler for multimodal LLMs."""

__version__ = "0.1.0"


def compile(model, keep=None, **kwargs):  # noqa: A001 - mirrors torch.compile's naming
    """Compile ``model`` with CLSE pruning; see :func:`clse_fx.api.compile`."""
    from clse_fx.api import compile as _compile

    return _compile(model, keep, **kwargs)
