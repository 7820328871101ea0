"""Models: where the weights are (`registry`), the sentence pooling of classifier heads (`pooling`), and a
model with its LoRA adapter (`lora`)."""

from hyperinf_ops.models.lora import LoadedModel, adapter_hash, adapter_parameters, batches, load_lora_model
from hyperinf_ops.models.pooling import pooling_of
from hyperinf_ops.models.registry import default_cache_dir, model_hash, resolve_model

__all__ = ["LoadedModel", "adapter_hash", "adapter_parameters", "batches", "default_cache_dir", "load_lora_model",
           "model_hash", "pooling_of", "resolve_model"]
