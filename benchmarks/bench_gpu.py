"""The gradient pass and the warm-up on the GPU the users have (issue 20 item 4): figures for the first lent GPU.

1. SmolLM2-135M-Instruct (bundled) + LoRA r=8 on q_proj/v_proj, chatterbot pairs: the product's gradient pass
   (stages.loading.gradient_batches, batch size `auto` from the free memory) and its warm-up (training.warmup_train)
   with the base weights in float32 and in bfloat16: examples/s, peak device memory, the chosen batch, and the
   bf16 per-example gradients' relative error against the float32 ones (same adapter).
2. A synthetic 4096-wide Llama (Llama-3-8B-shaped layers: hidden 4096, MLP 14336, 32 heads, 8 KV heads; 1 layer,
   random weights, a 32k vocabulary) + LoRA r=16 on q/k/v/o: per-example gradients in bf16 with and without
   activation checkpointing (examples/s, peak memory, checkpointed == plain), and their relative error against a
   float32 copy of the same weights.

    python benchmarks/bench_gpu.py [--device cuda] [--quick] [--out benchmarks/results/gpu/bench_gpu.json]

`--quick` shrinks everything (a 512-wide layer, 8 pairs) so the script's every piece runs on a CPU in about a
minute; the figures are only meaningful on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hyperinf_ops.core.gradients import lora_gradients_and_outputs  # noqa: E402
from hyperinf_ops.data.chatterbot import chatterbot_pairs  # noqa: E402
from hyperinf_ops.models import load_lora_model  # noqa: E402
from hyperinf_ops.settings import GradientSettings, LoraSettings, ModelSpec, TrainSettings  # noqa: E402
from hyperinf_ops.stages.loading import gradient_batches  # noqa: E402
from hyperinf_ops.training import warmup_train  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((got[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-30))
               for k in ref)


def _randomise_lora_b(model: torch.nn.Module, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def smollm2(device: torch.device, n: int, max_length: int, epochs: int) -> dict[str, Any]:
    pairs = chatterbot_pairs().head(n)
    records = [{"sample_id": str(i), "prompt": r.prompt, "response": r.response} for i, r in enumerate(pairs.itertuples())]
    out: dict[str, Any] = {"examples": len(records), "max_length": max_length}
    grads_of: dict[str, dict[str, torch.Tensor]] = {}
    for precision in ("float32", "bfloat16"):
        spec = ModelSpec(name="smollm2", task="causal_lm", max_length=max_length, device=str(device),
                         precision=precision)
        loaded = load_lora_model(spec, [], lora=LoraSettings(rank=8, alpha=16.0), seed=0)
        _randomise_lora_b(loaded.model)
        settings = GradientSettings(batch_size="auto", model_dtype=loaded.dtype_name)
        list(gradient_batches(loaded, records[:4], settings, max_length))  # warm-up of kernels and allocator
        _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        kept, sizes = [], []
        for _ids, grads, _outputs in gradient_batches(loaded, records, settings, max_length):
            sizes.append(len(_ids))
            kept.append({k: v.float().cpu() for k, v in grads.items()})
        _sync(device)
        seconds = time.perf_counter() - start
        grads_of[precision] = {k: torch.cat([g[k] for g in kept]) for k in kept[0]}
        row = {"gradient_pass_examples_per_s": len(records) / seconds, "gradient_pass_peak_gib": _peak_gib(device),
               "gradient_batch": max(sizes), "checkpointing": loaded.checkpointing,
               "grad_dtype": str(next(iter(kept[0].values())).dtype)}
        _reset_peak(device)
        train = TrainSettings(epochs=epochs, lr=2e-4, batch_size=16, seed=0)
        stats = warmup_train(loaded, records, train, max_length=max_length)
        row.update(warmup_examples_per_s=stats.examples_per_s, warmup_peak_gib=_peak_gib(device),
                   warmup_loss_per_epoch=list(stats.loss_per_epoch), warmup_micro_batch=stats.micro_batch,
                   lora_dtypes=sorted({str(p.dtype) for n, p in loaded.model.named_parameters() if "lora_" in n}),
                   base_dtype=loaded.dtype_name)
        out[precision] = row
        print(f"SmolLM2 {precision:8s} gradient pass {row['gradient_pass_examples_per_s']:8.1f} ex/s "
              f"(batch {row['gradient_batch']}, peak {row['gradient_pass_peak_gib'] or 0:.2f} GiB) | warm-up "
              f"{row['warmup_examples_per_s']:8.1f} ex/s (peak {row['warmup_peak_gib'] or 0:.2f} GiB, loss "
              f"{row['warmup_loss_per_epoch'][0]:.3f} -> {row['warmup_loss_per_epoch'][-1]:.3f})", flush=True)
        del loaded
    out["bf16_vs_fp32_grad_rel_err"] = _rel(grads_of["bfloat16"], grads_of["float32"])
    print(f"SmolLM2 bf16 vs fp32 per-example gradients: max relative error {out['bf16_vs_fp32_grad_rel_err']:.3e}")
    return out


def wide_layer(device: torch.device, quick: bool, batch: int, seq: int) -> dict[str, Any]:
    """One Llama-8B-shaped decoder layer (random weights) + LoRA: bf16 per-example gradients, checkpointed or not."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
                vocab_size=2048) if quick else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                    num_key_value_heads=8, vocab_size=32000)
    config = LlamaConfig(num_hidden_layers=1, max_position_embeddings=max(seq, 256), **dims)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    base32 = LlamaForCausalLM(config)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), lora)
    model.get_base_model().load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()},
                                           strict=False)
    _randomise_lora_b(model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    data = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
    out: dict[str, Any] = {"hidden": config.hidden_size, "layers": 1, "batch": batch, "tokens": seq,
                           "lora": "r=16 q,k,v,o", "base_dtype": "bfloat16"}
    results = {}
    for checkpointing in (False, True):
        lora_gradients_and_outputs(model, data, checkpointing=checkpointing)  # warm-up
        _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        grads, _ = lora_gradients_and_outputs(model, data, checkpointing=checkpointing)
        _sync(device)
        seconds = time.perf_counter() - start
        results[checkpointing] = grads
        key = "checkpointed" if checkpointing else "plain"
        out[key] = {"examples_per_s": batch / seconds, "peak_gib": _peak_gib(device)}
        print(f"{config.hidden_size}-wide layer bf16 {key:12s} {batch / seconds:8.2f} ex/s, peak "
              f"{out[key]['peak_gib'] or 0:.2f} GiB ({batch} x {seq} tokens)", flush=True)
    out["grad_dtype"] = str(next(iter(results[False].values())).dtype)
    out["checkpointed_equals_plain"] = all(torch.equal(results[False][k], results[True][k]) for k in results[False])
    out["checkpointed_vs_plain_rel_err"] = _rel(results[True], results[False])
    # float32 reference with the same weights (LoRA included): the bf16 error on the per-example gradients
    ref_model = model.float()
    ref = lora_gradients_and_outputs(ref_model, data)[0]
    out["bf16_vs_fp32_grad_rel_err"] = _rel(results[False], ref)
    print(f"{config.hidden_size}-wide layer: grads {out['grad_dtype']}, checkpointed == plain: "
          f"{out['checkpointed_equals_plain']} (rel {out['checkpointed_vs_plain_rel_err']:.1e}); bf16 vs fp32 "
          f"rel error {out['bf16_vs_fp32_grad_rel_err']:.3e}")
    del model, ref_model, base32
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of every piece")
    parser.add_argument("--out", default="benchmarks/results/gpu/bench_gpu.json")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        print(f"bench_gpu: ignoring {ignored}")
    device = torch.device(args.device)
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "torch": torch.__version__, "quick": args.quick,
                            "bf16_supported": bool(device.type == "cuda" and torch.cuda.is_bf16_supported())}
    start = time.perf_counter()
    info["smollm2"] = smollm2(device, n=8 if args.quick else 256, max_length=64 if args.quick else 256,
                              epochs=1)
    info["wide_layer"] = wide_layer(device, args.quick, batch=2 if args.quick else 8, seq=32 if args.quick else 512)
    info["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} ({info['seconds']:.0f} s)")
    return info


if __name__ == "__main__":
    main()
