"""TAESD in diffusers: ``TaesdVAE`` (any variant as ``pipe.vae``), ``use_taesd_vae``, live previews.

Lazy: ``contracts`` needs no diffusers, so this package imports it only when a name from
``model`` (TaesdVAE, ...) is asked for.
"""
_MODEL_NAMES = ("TaesdEncoderOutput", "TaesdVAE", "family_config")
__all__ = list(_MODEL_NAMES)


def __getattr__(name):
    if name in _MODEL_NAMES:
        from taesd.integrations.diffusers import model
        return getattr(model, name)
    raise AttributeError(f"module 'taesd.integrations.diffusers' has no attribute {name!r}")
