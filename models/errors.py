"""The one error type of the models part (and its artifact subtype)."""


class ModelError(ValueError):
    """A model, tap, key or weights file that cannot be used as asked."""


class ArtifactError(ModelError):
    """A model artifact (manifest.json + weights.safetensors) that is missing, corrupt or unsafe."""
