"""clse-fx: CLSE visual-token pruning as a graph compiler for multimodal LLMs."""

__version__ = "0.1.0"


def compile(model, options=None, **kwargs):  # noqa: A001 - mirrors torch.compile's naming
    """Compile ``model`` with CLSE pruning; see :func:`clse_fx.api.compile` and :class:`clse_fx.CompileOptions`."""
    from clse_fx.api import compile as _compile

    return _compile(model, options, **kwargs)


def __getattr__(name: str):
    if name == "CompileOptions":  # lazily, like compile: importing clse_fx stays free of torch
        from clse_fx.options import CompileOptions

        return CompileOptions
    raise AttributeError(f"module 'clse_fx' has no attribute {name!r}")
