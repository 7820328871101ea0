"""Estimator options: which method applies (G_l + lambda_l I)^-1, and how (defined once, in settings.py).

lambda_l = damping_ratio * mean of g^2 over the examples and entries of LoRA matrix l, for every method
(`CurvaturePartial.damping`). `Method` names the methods once; `METHODS` is its tuple of names.
"""

from hyperinf_ops.settings import METHODS, EstimatorOptions, Method

__all__ = ["METHODS", "EstimatorOptions", "Method"]
