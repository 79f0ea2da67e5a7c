"""Optional packages and the extra that installs each: a feature used without its extra fails with
one line naming the ``pip install`` to run, from the CLI and from Python alike."""
from __future__ import annotations

import functools

from taesd.errors import TaesdError

# Optional packages -> the extra that installs them.
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "diffusers": "diffusers",
          "transformers": "diffusers", "accelerate": "train", "tensorboard": "train", "matplotlib": "train",
          "skimage": "train", "psutil": "test", "pytest": "test", "av": "video"}


class MissingExtra(TaesdError, ModuleNotFoundError):
    """An optional package is missing. Still a ModuleNotFoundError (``hasattr``, ``try: import``
    patterns keep working) and a TaesdError (the CLI prints it as its one line)."""


def missing_extra(e: ModuleNotFoundError) -> "MissingExtra | None":
    """The one-line error for ``e`` when it is an optional package of ours, else None."""
    if isinstance(e, MissingExtra):
        return e
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return MissingExtra(f"this needs {top}, which is not installed: pip install 'taesd[{extra}]'", name=top)


def needs_extra(func):
    """Decorator: a missing optional package inside ``func`` becomes ``MissingExtra``."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ModuleNotFoundError as e:
            error = missing_extra(e)
            if error is None or error is e:
                raise
            raise error from e
    return wrapper
