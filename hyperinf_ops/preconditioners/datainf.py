"""DataInf: the Sherman-Morrison closed form on flattened gradients, streamed over the training set.

Swapping the mean and the inverse of (1/n) sum_i (g_i g_i^T + lambda I), each term inverted exactly:

    v (F + lambda I)^-1 ~ (1/(n lambda)) (n v - sum_i c_i g_i),   c_i = <v, g_i>_F / (lambda + |g_i|_F^2)

with g_i (r, d) the training gradient of one matrix and |g_i|_F^2 its squared Frobenius norm. Nothing is
prepared but lambda_l and the condition estimate; `apply` reads the training gradients as name -> (b, r, d)
batches, accumulating sum_i c_i g_i one batch at a time (memory: one batch), in options.dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from hyperinf_ops.core.stacks import check_stack
from hyperinf_ops.errors import EmptyTargetSetError
from hyperinf_ops.preconditioners.base import Batch, Prepared
from hyperinf_ops.preconditioners.method import Preconditioner

__all__ = ["DataInf"]


class DataInf(Preconditioner):
    method = "datainf"

    always_fp64 = True  # the condition estimate; apply runs in options.dtype

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        if train_batches is None:
            raise ValueError(
                "datainf needs the training gradients (train_batches; train_grads in estimators.precondition): "
                "its closed form sums over training examples"
            )
        dtype = prepared.options.torch_dtype
        rhs = {name: v.reshape(v.shape[0], -1).to(dtype) for name, v in vecs.items()}
        acc = {name: torch.zeros_like(x) for name, x in rhs.items()}
        n = 0
        for batch in train_batches:
            b = check_stack(batch, prepared.shapes, "train gradients")
            for name, x in rhs.items():
                g = batch[name].reshape(b, -1).to(device=x.device, dtype=dtype)
                coef = (x @ g.T) / (prepared.damping[name] + g.square().sum(1))
                acc[name] += coef @ g
            n += b
        if n == 0:
            raise EmptyTargetSetError("datainf: the training batches hold no examples")
        # (1/(n lambda)) (n v - sum_i c_i g_i), as (v - sum_i c_i g_i / n) / lambda.
        return {
            name: ((x - acc[name] / n) / prepared.damping[name]).reshape(vecs[name].shape).to(torch.float64)
            for name, x in rhs.items()
        }
