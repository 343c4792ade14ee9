"""Evaluation metrics as pure, jit-able accumulators plus host-side read-outs of their sums."""
from jaxseg.metrics.instance import InstanceAccumulator, instance_stats
from jaxseg.metrics.panoptic import panoptic_stats, pq_from_stats
from jaxseg.metrics.semantic import confusion_matrix, miou_from_confusion

__all__ = ["confusion_matrix", "miou_from_confusion", "panoptic_stats", "pq_from_stats",
           "instance_stats", "InstanceAccumulator"]
