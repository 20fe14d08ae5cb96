"""
The debiased loss weighting (Yu et al. 2024) against a float64 reference: the noise MSE term
times 1 / sqrt(SNR_t) (sqrt(SNR_t) on the x_0 error for x_start prediction), the VB term of
learned variances unweighted, its option end to end.
"""

import math

import numpy as np
import pytest
import torch

from improved_diffusion.options import config
from improved_diffusion.run import training
from improved_diffusion.script_util import create_gaussian_diffusion


def cosine_snr(T):
    """SNR_t of the cosine schedule from its definition (betas clipped at 0.999), float64."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out, prod = [], 1.0
    for i in range(T):
        prod *= 1 - min(1 - f((i + 1) / T) / f(i / T), 0.999)
        out.append(prod / (1 - prod))
    return np.array(out)


def model(x, t):
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) * 0.01)


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_weights_multiply_the_mse_term(predict_xstart):
    T = 100
    plain = create_gaussian_diffusion(steps=T, noise_schedule="cosine", predict_xstart=predict_xstart)
    debias = create_gaussian_diffusion(steps=T, noise_schedule="cosine", predict_xstart=predict_xstart,
                                       debias_weighting=True)
    snr = cosine_snr(T)
    ref = np.sqrt(snr) if predict_xstart else 1 / np.sqrt(snr)
    t = torch.tensor([0, 1, 10, 50, 98, 99])
    np.testing.assert_allclose(debias.loss_weights(t, "debias").double().numpy(), ref[t.numpy()], rtol=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=gen)
    a, b = plain.training_losses(model, x, t, noise=noise), debias.training_losses(model, x, t, noise=noise)
    np.testing.assert_allclose(b["mse"].double().numpy(), a["mse"].double().numpy() * ref[t.numpy()], rtol=1e-5)
    assert torch.equal(b["loss"], b["mse"])


def test_learned_sigma_weights_only_the_mse_term_and_refusals():
    T = 40
    kw = dict(steps=T, noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True)
    plain, debias = create_gaussian_diffusion(**kw), create_gaussian_diffusion(**kw, debias_weighting=True)
    learned = lambda x, t: torch.cat([model(x, t), 0.1 * x], dim=1)  # noqa: E731
    t = torch.tensor([0, 5, 20, 39])
    x = torch.linspace(-1, 1, 4 * 3 * 4).view(4, 3, 2, 2)
    noise = torch.sin(torch.arange(x.numel()).float()).view_as(x)
    a, b = plain.training_losses(learned, x, t, noise=noise), debias.training_losses(learned, x, t, noise=noise)
    assert torch.equal(a["vb"], b["vb"])
    torch.testing.assert_close(b["mse"], a["mse"] * debias.loss_weights(t))
    with pytest.raises(ValueError, match="use_kl"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", use_kl=True, debias_weighting=True)


def test_option_reaches_the_diffusion():
    assert config.BY_NAME["debias_weighting"].group == "methods"
    o = {opt.name: opt.default for opt in config.OPTIONS}
    o.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
             diffusion_steps=50, debias_weighting=True, p2_gamma=1.0)
    _, diffusion = training.build_model(o, "cpu")
    assert diffusion.debias_weighting is True and diffusion.loss_weighting.names == ("debias", "p2")
