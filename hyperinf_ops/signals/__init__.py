"""Per-example signals of label quality beside influence, each one ranking (higher = keep):

    outputs        the loss, logits, margin and probabilities a pass already computes (ExampleOutputs)
    margins        the margin z_y - max_{c != y} z_c and its mean over the warm-up's training steps (AUM)
    cross_fit      out-of-fold class probabilities from K warm-ups on K folds of the pool
    label_quality  cleanlab's label-quality scores, label issues and suggested labels from probabilities
    fusion         one ranking from several: the mean rank percentile
"""

from hyperinf_ops.signals.fusion import percentile_ranks, rank_fusion
from hyperinf_ops.signals.label_quality import LabelQuality, assess_labels
from hyperinf_ops.signals.margins import MarginHistory, classification_margins
from hyperinf_ops.signals.outputs import ExampleOutputs

__all__ = ["ExampleOutputs", "LabelQuality", "MarginHistory", "assess_labels", "classification_margins",
           "percentile_ranks", "rank_fusion"]
