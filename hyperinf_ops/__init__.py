"""hyperinf core: pure torch / numeric code, no Dagster import.

Public names used by the rest of the product and by external checks:
    per_example_lora_gradients, schulz_inverse, influence_scores
"""

from hyperinf_ops.estimators import influence_scores
from hyperinf_ops.gradients import per_example_lora_gradients
from hyperinf_ops.inverse import schulz_inverse

__all__ = ["influence_scores", "per_example_lora_gradients", "schulz_inverse"]
