"""What a thief sees: one image through a model with its key and through the stolen weights without it.

"Without the key" means what a copy of the artifact gives whoever holds it: for `cp` the weights as
stored, run with no permutation at the tap (docs/references.md [000]); for block and per-image models
the same weights fed the plain image, since only the key holder can encrypt it ([001], [003]).
Nothing here returns or logs key material: the answer is two masks, their class counts, and the
model's thief's-advantage figures from a suite report (`seglock attack suite --json`) if it has one.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglock.app import inference
from seglock.app.home import Home
from seglock.app.imageio import Upload, encode_mask_png, resize_mask, resize_rgb
from seglock.app.registry import HostedModel
from seglock.client.modes import Mode
from seglock.models import ArtifactError

log = logging.getLogger("seglock.thief")

SUITE_REPORT = "suite.json"  # HOME/models/<name>/suite.json, from `seglock attack suite --json`
_MAX_REPORT_BYTES = 1 << 20
_REPORT_KEYS = ("kind", "model", "fraction", "owner", "no_key", "alternatives", "attacks", "advantage")

WITHOUT_KEY_MEANS = {
    "cp": "the stored weights run as they are, with no key at the tap",
    "block": "the stored weights fed the plain image, which only the key holder can encrypt",
}


def without_key_means(mode: Mode) -> str:
    return WITHOUT_KEY_MEANS["cp" if mode is Mode.CP else "block"]


def model_inputs(upload: Upload, hosted: HostedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(the keyed model's input, the thief's input) for a plain image."""
    plain = resize_rgb(upload.array, tuple(hosted.manifest.input_size))
    keyed = inference.to_tensor(inference.plain_to_model_array(upload.array, hosted), hosted)
    return keyed, inference.to_tensor(plain, hosted)


def stolen_mask(home: Home, name: str, artifact: Path | None, tensor: torch.Tensor,
                device: torch.device) -> np.ndarray:
    """The class-index mask the stored weights give without their key (cp: no permutation applied).

    The weights are opened as the server opens them (decrypted in memory when sealed at rest): the
    view shows what a thief holding the plain protected artifact, e.g. an export, would get."""
    if artifact is None:
        raise ArtifactError("the served revision is no longer on disk")
    module, _ = home.load_revision(name, artifact)
    module.to(device).eval()
    with torch.inference_mode():
        logits = module(tensor[None].to(device))
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def mask_summary(mask: np.ndarray, size: tuple[int, int], class_names: list[str]) -> tuple[np.ndarray, dict]:
    """(the mask at `size`, {"mask_png": base64 palette PNG, "counts": {class name: pixels}})."""
    full = resize_mask(mask, size)
    counts = np.bincount(full.reshape(-1), minlength=len(class_names))
    named = {class_names[i] if i < len(class_names) else str(i): int(c) for i, c in enumerate(counts) if c}
    return full, {"mask_png": base64.b64encode(encode_mask_png(full)).decode("ascii"), "counts": named}


def suite_report(home: Home, name: str) -> dict[str, Any] | None:
    """The model's thief's-advantage figures from HOME/models/<name>/suite.json, or None.

    A file that is missing, too large, not JSON, not a suite report of this model, or without a
    numeric advantage counts as none (and is logged), so a stray file never breaks the view.
    """
    path = home.model_dir(name) / SUITE_REPORT
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > _MAX_REPORT_BYTES:
            raise ValueError(f"larger than {_MAX_REPORT_BYTES} bytes")
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or report.get("kind") != "suite":
            raise ValueError('not a report of kind "suite"')
        if report.get("model") not in (None, name):
            raise ValueError(f"it reports model {report.get('model')!r}")
        advantage = report.get("advantage")
        if isinstance(advantage, bool) or not isinstance(advantage, (int, float)):
            raise ValueError("it has no numeric advantage")
    except (OSError, ValueError) as exc:
        log.warning("model %s: suite report %s ignored: %s", name, path, str(exc).splitlines()[0][:200])
        return None
    return {key: report[key] for key in _REPORT_KEYS if key in report}
