"""Named errors. Every user-facing failure raises one of these with a message that names the problem."""

from __future__ import annotations


class HyperinfError(Exception):
    """Base class of every error hyperinf raises on purpose."""


class GradientMismatchError(HyperinfError, ValueError):
    """Gradient dicts disagree: different LoRA matrix names, or shapes that do not line up."""


class EmptyTargetSetError(HyperinfError, ValueError):
    """A target set (or a candidate pool) has no examples."""


class NonFiniteGradientError(HyperinfError, ValueError):
    """A gradient or curvature tensor holds NaN or inf."""


class NotPositiveDefiniteError(HyperinfError, ValueError):
    """A matrix handed to an SPD-only routine is not symmetric positive definite."""


class InverseNotConvergedError(HyperinfError, RuntimeError):
    """An iterative inverse stopped above its tolerance; its result must not be used silently."""


class UnsupportedMethodError(HyperinfError, ValueError):
    """The chosen influence method cannot do what was asked (e.g. self-influence from a prepared LiSSA)."""


class FingerprintMismatchError(HyperinfError):
    """Stored rows were made under a different model / adapter / row compression / module set."""


class ConfigError(HyperinfError, ValueError):
    """The YAML configuration is invalid (unknown keys, wrong types, impossible values)."""


class DataError(HyperinfError, ValueError):
    """Input data is unusable: missing columns, empty pool, unknown labels, texts that tokenize to nothing."""


class ModelLoadError(HyperinfError):
    """A model name or path does not resolve to a loadable Hugging Face model."""


class WarmupFailedError(HyperinfError):
    """The warm-up adapter did not learn: rankings made under it are not exported."""
