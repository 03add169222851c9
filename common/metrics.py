"""Cost accounting shared by the study and the bench: FLOPs of one call, counted by PyTorch.

The study-only metrics (FID/KID on classifier features, reconstruction and re-identification)
moved to `collafuse.experiments.metrics`, which needs the `experiments` extra; the server and
client never import them. Their old names here still resolve, lazily, for callers not yet moved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

# Names that lived here before the move; reading one imports the study module on demand, so
# importing this module never pulls in torchmetrics.
_MOVED = frozenset(
    {
        "ASSET_PATH",
        "CHECKPOINT_FORMAT",
        "DATA_RANGE",
        "INPUT_SIZE",
        "ClassifierFeatures",
        "ClassifierMeta",
        "FeatureExtractor",
        "FeatureNet",
        "FidKid",
        "InceptionFeatures",
        "MetricsError",
        "as_feature_extractor",
        "classifier_accuracy",
        "extract_features",
        "fid_kid",
        "inception_feature_extractor",
        "kid_between",
        "load_feature_net",
        "psnr",
        "reidentification_hits",
        "reidentification_rate",
        "save_feature_net",
        "ssim",
        "to_grey_28",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module("collafuse.experiments.metrics"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of `fn`, as PyTorch's FlopCounterMode counts them.

    Counts matrix multiplies and convolutions (2 per multiply-add), forward and, if `fn` calls
    `backward()`, backward; element-wise operations (activations, norms, optimiser updates) are
    not counted. Run a warm-up call first if `fn` builds anything lazily.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
