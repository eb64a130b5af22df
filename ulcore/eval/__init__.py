"""Evaluation: FID on the standard InceptionV3 network, PSNR / SSIM, FVD from user-supplied I3D weights, reports.

Light imports only (torch, numpy); the stage itself is `ulcore.eval.evaluate.run_evaluate(cfg)`.
"""

from ulcore.eval.fid import FeatureStats, RunningStats, feature_statistics, fid_from_stats, frechet_distance
from ulcore.eval.fvd import fvd
from ulcore.eval.i3d import I3DFeatures, I3DUnavailable
from ulcore.eval.i3d_net import InceptionI3d
from ulcore.eval.image_metrics import psnr, ssim
from ulcore.eval.inception import (FidFeatureExtractor, FidWeightsInvalid, FidWeightsNotFound, WeightsSource,
                                   resolve_fid_weights)

__all__ = ["FeatureStats", "RunningStats", "feature_statistics", "fid_from_stats", "frechet_distance", "I3DFeatures",
           "I3DUnavailable", "InceptionI3d", "fvd", "psnr", "ssim", "FidFeatureExtractor", "FidWeightsInvalid",
           "FidWeightsNotFound", "WeightsSource", "resolve_fid_weights"]
