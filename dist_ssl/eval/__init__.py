"""Frozen-backbone evaluation: feature extraction over ranks, weighted k-NN, linear probe.

Entry points: ``dist-ssl-eval`` / ``tools/eval.py`` (:mod:`dist_ssl.eval.cli_eval`) and
``dist-ssl-tsne`` / ``tools/tsne.py`` (:mod:`dist_ssl.eval.cli_tsne`).
"""
from .features import EvalError, extract_features, load_frozen_backbone, save_features
from .knn import knn_accuracy, knn_votes, rank_classes, topk_accuracy
from .linear_probe import LinearProbeConfig, linear_probe

__all__ = [
    "EvalError",
    "LinearProbeConfig",
    "extract_features",
    "knn_accuracy",
    "knn_votes",
    "linear_probe",
    "load_frozen_backbone",
    "rank_classes",
    "save_features",
    "topk_accuracy",
]
