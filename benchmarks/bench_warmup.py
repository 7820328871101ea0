"""Which warm-up recipe learns the bundled tasks? Held-out accuracy per recipe, side by side, in one run.

    python benchmarks/bench_warmup.py                          # BBC News 200 / 800 pool, Rotten Tomatoes 1,000
    python benchmarks/bench_warmup.py --datasets "bbc 200"     # some of them
    python benchmarks/bench_warmup.py --quick                  # a tiny random model on toy data (seconds)

Each recipe (lr, epochs, batch size; linear decay; LoRA r=8 on query+value; the classifier head trains with the
adapter as peft `modules_to_save`) fine-tunes a fresh MiniLM adapter on a pool with 20% of labels flipped and is
evaluated on the clean target set before training and after every epoch (`training.warmup_train(heldout=...)`),
next to the majority-class baseline (`evaluation.majority_baseline`). The warm-up check of the pipeline fails
when the final held-out accuracy does not beat that baseline. Results: docs/results.md ("Warm-up defaults").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperinf_ops.evaluation import majority_baseline  # noqa: E402
from hyperinf_ops.models import load_lora_model  # noqa: E402
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings  # noqa: E402
from hyperinf_ops.training import warmup_train  # noqa: E402

# (lr, epochs, batch size): the earlier README default, the demo's recipe, and two between / beyond.
RECIPES = [(3e-4, 2, 32), (1e-3, 3, 16), (2e-3, 2, 16), (2e-3, 3, 16)]
LORA = LoraSettings(rank=8, alpha=16, modules=("query", "value"))


DATASETS = ("bbc 200", "bbc 800", "rotten tomatoes 1000")


def datasets(work: Path, names: Sequence[str] = DATASETS) -> dict[str, tuple[list[dict], list[dict], int]]:
    """name -> (pool records, target records, max_length) of the bundled builders."""
    from hyperinf_ops.data.bbc import build_bbc_dataset
    from hyperinf_ops.data.demo import build_demo_dataset

    def records(paths) -> tuple[list[dict], list[dict]]:
        pool = pd.concat([pd.read_parquet(s) for s in paths.shards])
        target = pd.read_parquet(paths.target)
        return ([{"text": t, "label": y} for t, y in zip(pool["text"], pool["label"], strict=True)],
                [{"text": t, "label": y} for t, y in zip(target["text"], target["label"], strict=True)])

    out = {}
    for name in names:
        if name.startswith("bbc "):
            n = int(name.split()[1])
            paths = build_bbc_dataset(work / f"bbc{n}", n_pool=n, n_target=200, n_test=5)
            out[name] = (*records(paths), 128)
        else:
            out[name] = (*records(build_demo_dataset(work / "rt", n_pool=1000, n_target=300)), 64)
    return out


def fit(model: str, pool: list[dict], target: list[dict], max_length: int, lr: float, epochs: int,
        batch: int) -> dict:
    labels = sorted({r["label"] for r in pool})
    spec = ModelSpec(name=model, max_length=max_length, device="cpu")
    loaded = load_lora_model(spec, labels, lora=LORA, seed=0)
    train = TrainSettings(lr=lr, epochs=epochs, batch_size=batch, seed=0)
    start = time.perf_counter()
    stats = warmup_train(loaded, pool, train, max_length=max_length, heldout=target)
    base = majority_baseline([r["label"] for r in pool], [r["label"] for r in target])
    return {"lr": lr, "epochs": epochs, "batch_size": batch, "train_accuracy": stats.accuracy_per_epoch[-1],
            "heldout_accuracy": stats.heldout_accuracy_per_epoch, "majority": base.accuracy,
            "learns": stats.heldout_accuracy_per_epoch[-1] > base.accuracy, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="results so far, rewritten after every fit")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import save_tiny_model
            from toy_data import toy_records

            model = str(save_tiny_model(Path(tmp) / "model"))
            sets = {"toy": (toy_records(64), toy_records(96)[64:], 16)}
            recipes = [(3e-2, 4, 8), (1e-9, 1, 8)]
        else:
            model, sets, recipes = "minilm", datasets(Path(tmp), args.datasets), RECIPES
        results = []
        for name, (pool, target, max_length) in sets.items():
            for lr, epochs, batch in recipes:
                row = {"dataset": name, **fit(model, pool, target, max_length, lr, epochs, batch)}
                results.append(row)
                print(f"{name:<22} lr {lr:<7g} epochs {epochs} batch {batch:<3} train acc {row['train_accuracy']:.3f} "
                      f"held-out acc {' -> '.join(f'{a:.3f}' for a in row['heldout_accuracy'])} "
                      f"(majority {row['majority']:.3f}) {'learns' if row['learns'] else 'NO BETTER THAN MAJORITY'} "
                      f"{row['seconds']:.0f} s", flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
