"""charnn: character-level recurrent neural networks on PyTorch.

Train a character language model, generate text from it, classify text with
its encoder, or use it as an autocomplete engine::

    import charnn
    result = charnn.train(charnn.TrainConfig(corpus=["input.txt"], time_budget=600))

Names are imported lazily, so ``import charnn`` (and the CLI's help) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CharnnError": "errors",
    "Vocabulary": "vocab",
    "TrainConfig": "training",
    "TrainResult": "training",
    "Trainer": "training",
    "train": "training",
    "CharRNN": "model",
    "ModelConfig": "model",
    "TextClassifier": "classify",
    "load": "lm",
    "LanguageModel": "lm",
    "Completer": "completion",
    "Suggestion": "completion",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'charnn' has no attribute {name!r}")


def __dir__():
    return __all__
