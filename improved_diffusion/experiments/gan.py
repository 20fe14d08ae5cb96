"""
A small DCGAN (Radford, Metz and Chintala 2015), the paper's contrast to the diffusion models
in the consistency, interpolation and Hessian analyses (section 3, Table 1, Figs. 3-4).

The architecture follows DCGAN's guidelines at any power-of-two image size >= 8:

- **Generator**: z [N x latent_dim] -> a 4x4 map of width * 2^(L-1) channels by a 4x4
  transposed convolution, then L - 1 stride-2 transposed convolutions (4x4 kernels) that
  double the size and halve the channels, each followed by BatchNorm and ReLU, and a last
  stride-2 transposed convolution to the image channels with tanh; L = log2(image_size / 4).
  At 16x16 with width 64: 64 -> 128 x 4x4 -> 64 x 8x8 -> 3 x 16x16.
- **Discriminator**: the mirror image: stride-2 4x4 convolutions that halve the size and
  double the channels (width, 2 width, ...), BatchNorm on all but the first, LeakyReLU(0.2),
  and a last 4x4 convolution of the 4x4 map to one logit.
- Weights drawn from N(0, 0.02), BatchNorm scales from N(1, 0.02), biases 0 (the paper's
  initialisation); Adam with lr 2e-4 and beta1 0.5 in scripts/gan_train.py.

Losses (the non-saturating form of Goodfellow et al., on logits):

    L_D = softplus(-D(x)) + softplus(D(G(z)))     = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    L_G = softplus(-D(G(z)))                      = -log sigmoid(D(G(z)))

each a mean over the batch. During training BatchNorm uses batch statistics, real and fake
batches pass through D separately. The analyses evaluate the same losses with batch
statistics but without touching the running averages (`batch_statistics`), so a loss is a
deterministic function of the weights on a fixed batch and fixed latents. Images are
sampled in eval mode (running averages), so image m depends on its latent alone.

A checkpoint of step N in a run folder (`checkpoint_files`, saved by run_dir.RunDir):
`ganNNNNNN.pt` {"generator", "discriminator": state dicts, "arch": dict}, `gan_optNNNNNN.pt`
{"generator", "discriminator": optimizer states} and `stateNNNNNN.pt`, the state file of
improved_diffusion.run.checkpoint (step, file sizes and SHA-256, RNG states, data position),
written last; `gan_config.json` beside them marks the folder as a GAN run.
"""

import contextlib
import math
import os
import re

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

from ..run import checkpoint as ckpt

GAN_CONFIG = "gan_config.json"
GAN_PATTERN = re.compile(r"^gan(\d{6,})\.pt$")
GAN_PREFIX = "gan:"


def num_levels(image_size):
    """L = log2(image_size / 4): the number of stride-2 layers of each network."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"the DCGAN needs a power-of-two image size of at least 8, got {image_size}")
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    """z [N x latent_dim] -> images [N x channels x image_size x image_size] in [-1, 1]."""

    def __init__(self, latent_dim=64, width=64, image_size=16, channels=3):
        super().__init__()
        self.latent_dim = latent_dim
        levels = num_levels(image_size)
        ch = width * 2 ** (levels - 1)
        layers = [nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z):
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """images [N x channels x S x S] -> logits [N]."""

    def __init__(self, width=64, image_size=16, channels=3):
        super().__init__()
        levels = num_levels(image_size)
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(levels - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.net(x).reshape(-1)


def init_weights(module):
    """DCGAN's initialisation: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def create_gan(arch):
    """(Generator, Discriminator) of an arch dict {latent_dim, g_width, d_width, image_size, channels}."""
    g = Generator(arch["latent_dim"], arch["g_width"], arch["image_size"], arch.get("channels", 3))
    d = Discriminator(arch["d_width"], arch["image_size"], arch.get("channels", 3))
    return g, d


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def discriminator_loss(real_logits, fake_logits):
    """L_D = mean softplus(-D(x)) + mean softplus(D(G(z))) (binary cross-entropy on logits)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits):
    """The non-saturating L_G = mean softplus(-D(G(z))) = -mean log sigmoid(D(G(z)))."""
    return F.softplus(-fake_logits).mean()


@contextlib.contextmanager
def batch_statistics(*modules):
    """
    BatchNorm with the batch's statistics (as in training), without updating the running
    averages or counters: the modules are in train mode with track_running_stats off for the
    duration, then restored. Other layers (no dropout here) behave the same in both modes.
    """
    saved = []
    for module in modules:
        saved.append((module, module.training))
        module.train()
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        for module, training in saved:
            module.train(training)


def gan_losses(generator, discriminator, real, z):
    """
    {"generator": L_G, "discriminator": L_D} of one fixed real batch (in [-1, 1], NCHW) and
    fixed latents, with batch statistics and the running averages untouched. Real and fake
    images pass through D as separate batches, as in training.
    """
    with batch_statistics(generator, discriminator):
        fake = generator(z)
        fake_logits = discriminator(fake)
        real_logits = discriminator(real)
        return {
            "generator": generator_loss(fake_logits),
            "discriminator": discriminator_loss(real_logits, fake_logits),
        }


# ---------------------------------------------------------------------------------------
# Latents and images
# ---------------------------------------------------------------------------------------


def sample_latents(num_samples, latent_dim, seed):
    """
    Latent m of `num_samples` is drawn by its own generator seeded with
    sampling.sample_seed(seed, m): the same latents for every GAN of that latent_dim, whatever
    the batch size.
    """
    from ..evaluation.sampling import sample_seed

    rows = [
        th.randn(latent_dim, generator=th.Generator().manual_seed(sample_seed(seed, m)))
        for m in range(num_samples)
    ]
    return th.stack(rows)


@th.no_grad()
def generate(generator, z, batch_size=64):
    """uint8 NHWC images of latents z, the generator in eval mode (running averages)."""
    from ..evaluation.sampling import to_uint8

    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    try:
        out = [to_uint8(generator(z[i : i + batch_size].to(device))) for i in range(0, len(z), batch_size)]
    finally:
        generator.train(was_training)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def gan_name(step):
    return f"gan{step:06d}.pt"


def gan_opt_name(step):
    return f"gan_opt{step:06d}.pt"


def checkpoint_files(step, generator, discriminator, opt_g, opt_d, arch):
    """{file name: contents} of the checkpoint of `step`, for run_dir.RunDir.save (which adds
    the state file): ganNNNNNN.pt with both networks and the arch, gan_optNNNNNN.pt with both
    optimizers."""
    return {
        gan_name(step): {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                         "arch": dict(arch)},
        gan_opt_name(step): {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
    }


def strip_prefix(path):
    """A model path without its optional "gan:" prefix."""
    return path[len(GAN_PREFIX):] if path.startswith(GAN_PREFIX) else path


def is_gan_checkpoint(path):
    """Whether `path` names a GAN checkpoint: a "gan:" prefix, a ganNNNNNN.pt file name, or a
    gan_config.json beside it."""
    if path.startswith(GAN_PREFIX):
        return True
    if GAN_PATTERN.match(os.path.basename(path)):
        return True
    return os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), GAN_CONFIG))


def load_gan(path, device="cpu"):
    """
    (generator, discriminator, arch) of a ganNNNNNN.pt file (optionally "gan:"-prefixed), both
    networks in eval mode on `device`. The file is read with weights_only=True and loaded strictly.
    """
    path = strip_prefix(path)
    obj = ckpt.read_file(path, "GAN checkpoint")
    if not isinstance(obj, dict) or not {"generator", "discriminator", "arch"} <= set(obj):
        raise ValueError(
            f"{path} is not a GAN checkpoint (expected the ganNNNNNN.pt of scripts/gan_train.py, "
            "with generator, discriminator and arch)"
        )
    arch = dict(obj["arch"])
    g, d = create_gan(arch)
    for what, net in (("generator", g), ("discriminator", d)):
        ckpt.check_state_dict_matches(net, obj[what], f"{path} ({what})")
        net.load_state_dict(obj[what], strict=True)
        net.to(device).eval()
    return g, d, arch


def count_params(module):
    return sum(p.numel() for p in module.parameters())
