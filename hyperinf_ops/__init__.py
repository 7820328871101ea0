"""hyperinf core: pure torch / numeric code, no Dagster import.

Public names used by the rest of the product and by external checks:
    per_example_lora_gradients, schulz_inverse, influence_scores

They are imported lazily so that a process which only needs, say, the store or the config does not pay
for importing transformers and peft (seconds of CPU in every Dagster step subprocess).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperinf_ops.core.estimators import influence_scores
    from hyperinf_ops.core.gradients import per_example_lora_gradients
    from hyperinf_ops.core.inverse import schulz_inverse

_PUBLIC = {
    "influence_scores": "hyperinf_ops.core.estimators",
    "per_example_lora_gradients": "hyperinf_ops.core.gradients",
    "schulz_inverse": "hyperinf_ops.core.inverse",
}

__all__ = ["influence_scores", "per_example_lora_gradients", "schulz_inverse"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hyperinf_ops' has no attribute {name!r}")
