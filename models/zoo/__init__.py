"""The bundled demo models: small `tiny` models trained by seglock's own commands on synthetic scenes.

Each is an artifact folder `models/zoo/<name>/` (manifest.json + weights.safetensors). The keyed
demos ship their key as a PUBLIC key file `models/zoo/keys/<name>.json`: a server's first start
imports them and re-keys demo-cp to a fresh key (seglock.app.bootstrap). How each was made, and what it
scores with the right key, without it and with wrong keys: models/zoo/README.md.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS = ("demo-plain", "demo-cp", "demo-shf", "demo-per-image")


def zoo_dir() -> Path:
    """The folder holding the demo artifacts (this package's folder)."""
    return Path(__file__).resolve().parent


def key_file(name: str) -> Path:
    """The bundled public key file of a demo model (present for the keyed ones)."""
    return zoo_dir() / "keys" / f"{name}.json"
