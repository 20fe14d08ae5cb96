"""
The one evaluator of sample quality: the training loop's periodic evaluation
(`--eval_interval`), `scripts/fid.py` and the study all score images through `Evaluator`,
so that a number means the same thing wherever it was computed.

An `Evaluator` owns which metrics (`metrics.parse_metrics`), the reference file
(`metrics.load_reference`), the feature networks (loaded once, on first use), how N images
are sampled from a model (respacing, seed, precision, classes: a `Sampling`) and the
metrics of those images (`metrics.evaluate`). Called as `evaluator(model, step)` it is what
`TrainLoop` expects: samples, a grid under LOG_DIR/samples and the metrics.
"""

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from .. import dist_util
from . import fid, metrics, sampling
from ..script_util import create_diffusion_from_options

PR_METRICS = ("precision", "recall", "kid")  # the metrics that need reference features
GRID_SIZE = 64  # images in the grid saved at each training evaluation


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How an evaluation draws its images from a model; sample i depends only on (seed, i)."""

    model_options: dict  # the model and diffusion flags of the run (config.MODEL_GROUPS)
    respacing: str  # e.g. "ddim50", "250"; "ddim..." samples with DDIM
    num_samples: int
    batch_size: int  # images per forward pass per rank
    seed: int = 0
    class_cond: bool = False
    num_classes: int = 1000  # the data's classes when class-conditional
    autocast_dtype: Optional[torch.dtype] = None  # bf16 autocast when the run trains in bf16

    def diffusion(self):
        return create_diffusion_from_options(self.model_options, timestep_respacing=self.respacing)


class Evaluator:
    """
    Metrics of images (`score`), of a model's samples (`sample` then `score`), or, called
    as `evaluator(model, step)`, the training loop's periodic evaluation.

    :param reference: a `metrics.Reference` or the path of a reference file (scripts/fid.py
                      ref); None for an evaluator that only samples.
    :param wanted: metric names from `metrics.METRICS` (checked against the reference).
    :param sampling: a `Sampling`, needed by `sample` and `__call__`.
    :param inception: path of the feature network ("": the bundled Inception-v3).
    :param logits_network: path of a classifier for the Inception Score ("": none).
    :param feature_batch: images per forward pass of the feature network.
    :param pr_mode: how precision and recall round their distances, "adm" or "exact"
                    (`metrics.precision_recall`).
    :param log_dir: training: where the sample grids go (LOG_DIR/samples/step_NNNNNN.png).
    :param logger: training: receives each grid as an image summary.
    :param networks: a dict to keep the loaded feature networks in, shared between evaluators.
    """

    def __init__(self, reference=None, wanted=("fid",), *, sampling=None, device="cpu", inception="",
                 logits_network="", feature_batch=64, kid_subsets=100, kid_subset_size=1000, progress=False,
                 log_dir=None, logger=None, networks=None, pr_mode=metrics.DEFAULT_PR_MODE):
        if isinstance(reference, str):
            reference = metrics.load_reference(reference, wanted)
        self.reference = reference
        self.wanted = tuple(wanted)
        self.sampling = sampling
        self.device = device
        self.inception = inception
        self.logits_network = logits_network
        self.feature_batch = feature_batch
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        if pr_mode not in metrics.PR_MODES:
            raise ValueError(f"--pr_mode must be one of {', '.join(metrics.PR_MODES)}, got {pr_mode!r}")
        self.pr_mode = pr_mode
        self.progress = progress
        self.log_dir = log_dir
        self.logger = logger
        # The feature networks, loaded on first use; a dict shared by evaluators (the study's
        # runs) loads each once.
        self._networks = {} if networks is None else networks
        self._diffusion = None

    # ---- the feature networks, loaded once

    @property
    def extractor(self):
        if "inception" not in self._networks:
            self._networks["inception"] = fid.load_inception(self.inception or None, device=self.device)
        return self._networks["inception"]

    @property
    def classifier(self):
        if "logits" not in self._networks:
            self._networks["logits"] = metrics.load_logits_network(self.logits_network, device=self.device)
        return self._networks["logits"]

    # ---- images

    def sample(self, model, seed=None):
        """`sampling.num_samples` uint8 NHWC images of `model`, over all ranks (every rank calls)."""
        s = self.sampling
        if s is None:
            raise ValueError("this evaluator has no Sampling: it scores given images only")
        if self._diffusion is None:
            self._diffusion = s.diffusion()
        images, _ = sampling.sample_images(
            model, self._diffusion, num_samples=s.num_samples, batch_size=s.batch_size,
            image_size=s.model_options["image_size"], device=self.device, seed=s.seed if seed is None else seed,
            use_ddim=s.respacing.startswith("ddim"), class_cond=s.class_cond, num_classes=s.num_classes,
            progress=False, autocast_dtype=s.autocast_dtype,
        )
        return images

    def features(self, images, spatial=False):
        """Pooled Inception features of uint8 NHWC images; with `spatial`, (pooled, spatial or None)."""
        return fid.compute_features(images, self.extractor, self.feature_batch, self.device,
                                    progress=self.progress, spatial=spatial)

    def score(self, images, ref_features=None):
        """
        {metric: value} of uint8 NHWC images against the reference (kid with kid_std), plus
        inception_score and its std when a logits network was given.

        :param ref_features: pooled features of reference images for precision, recall and
                             KID instead of the reference file's pool_features.
        """
        if self.reference is None:
            raise ValueError("this evaluator has no reference file: it only samples")
        spatial = "sfid" in self.wanted
        pooled = self.features(images, spatial=spatial)
        pooled, spatial_features = pooled if spatial else (pooled, None)
        result = metrics.evaluate(
            pooled, self.reference, self.wanted, spatial=spatial_features, ref_features=ref_features,
            kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, device=self.device,
            pr_mode=self.pr_mode,
        )
        if self.logits_network:
            logits = fid.compute_features(images, self.classifier, self.feature_batch, self.device,
                                          progress=self.progress)
            result["inception_score"], result["inception_score_std"] = metrics.inception_score(logits)
        return result

    # ---- the training loop's periodic evaluation

    def __call__(self, model, step):
        """
        The metrics of `model`'s samples at training step `step` (without kid_std); rank 0
        also saves the first 64 samples as LOG_DIR/samples/step_NNNNNN.png and hands the grid
        to the logger (written when TensorBoard is installed). Other ranks return {}.
        """
        images = self.sample(model)
        if not dist_util.is_main():
            return {}
        if self.log_dir is not None:
            self.save_grid(images, step)
        result = self.score(images)
        result.pop("kid_std", None)
        return result

    def save_grid(self, images, step):
        from PIL import Image

        grid = os.path.join(self.log_dir, "samples", f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(grid), exist_ok=True)
        sampling.save_grid(images[:GRID_SIZE], grid)
        if self.logger is not None:
            with Image.open(grid) as image:
                self.logger.log_image("samples", np.asarray(image.convert("RGB")), step)
        return grid


def for_training(opts, model_options, precision, device, num_classes, log_dir, logger=None):
    """
    The evaluator of `--eval_interval`: the --eval_metrics of --eval_num_samples samples
    (--eval_respacing, seeded by --seed, bf16 autocast when the run is bf16) against
    --eval_ref_stats, precision and recall as --pr_mode says. Every problem with these flags
    fails here, before any training.
    """
    wanted = metrics.parse_metrics(opts["eval_metrics"], "--eval_metrics")
    fewest = metrics.NEAREST_NEIGHBOURS + 1 if {"precision", "recall"} & set(wanted) else 2
    if opts["eval_num_samples"] < fewest:
        raise ValueError(f"--eval_metrics {opts['eval_metrics']} needs --eval_num_samples of at least {fewest}")
    if not opts["eval_ref_stats"]:
        raise ValueError("--eval_interval needs --eval_ref_stats (make them with scripts/fid.py ref)")
    # The file must hold what every metric needs: checked now, not after hours of training.
    reference = metrics.load_reference(opts["eval_ref_stats"], wanted)
    spec = Sampling(
        model_options=model_options, respacing=opts["eval_respacing"], num_samples=opts["eval_num_samples"],
        batch_size=opts["eval_batch_size"], seed=opts["seed"], class_cond=opts["class_cond"],
        num_classes=num_classes,  # the data's classes, not the embedding's 1000 rows
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
    )
    return Evaluator(reference, wanted, sampling=spec, device=device, inception=opts["inception"],
                     log_dir=log_dir, logger=logger, pr_mode=opts["pr_mode"])
