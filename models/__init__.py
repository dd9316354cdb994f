"""The split model in PyTorch: SVD compression head, link elimination, edge and cloud halves."""

from models.compression import CompressionHead, SplitFeedForward, truncated_svd
from models.loading import LoadedEncoder, load_encoder
from models.spec import EncoderSpec, SplitSpec
from models.split import CloudPart, EdgePart, LabelHead, SplitModel, build_full, build_split, rate_groups
from splitwire.manifest import EDGE_INPUTS  # the names EdgePart.forward takes, in its order

__all__ = [
    "EDGE_INPUTS",
    "CloudPart",
    "CompressionHead",
    "EdgePart",
    "EncoderSpec",
    "LabelHead",
    "LoadedEncoder",
    "SplitFeedForward",
    "SplitModel",
    "SplitSpec",
    "build_full",
    "build_split",
    "load_encoder",
    "rate_groups",
    "truncated_svd",
]
