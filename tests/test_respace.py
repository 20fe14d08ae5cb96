"""
Timestep respacing: the kept steps of "N", "a,b,c" and "ddimN" sections, and
SpacedDiffusion's rebuilt process and timestep mapping.
"""

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.respace import SpacedDiffusion, space_timesteps


def expected_sections(T, counts):
    """
    The original's rule, written with numpy: equal portions (the first T % n
    one longer), each strided by (size - 1) / (count - 1) with the index
    accumulated step by step in float64 and rounded half to even.
    """
    n = len(counts)
    sizes = [T // n + (1 if i < T % n else 0) for i in range(n)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    steps = set()
    for start, size, count in zip(starts, sizes, counts):
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        idx = np.add.accumulate(np.concatenate([[0.0], np.full(count - 1, stride)]))
        steps |= {int(start + v) for v in np.round(idx).astype(np.int64)}
    return steps


def test_250_of_4000():
    got = space_timesteps(4000, "250")
    assert got == expected_sections(4000, [250])
    assert len(got) == 250 and min(got) == 0 and max(got) == 3999
    gaps = np.diff(sorted(got))
    assert set(gaps) <= {16, 17}  # 3999 / 249 = 16.06


def test_10_15_20_of_300():
    got = space_timesteps(300, "10,15,20")
    assert got == expected_sections(300, [10, 15, 20])
    assert len(got) == 45
    # first section: 0..99 strided exactly by 11
    assert {s for s in got if s < 100} == set(range(0, 100, 11))
    assert {0, 99, 100, 199, 200, 299} <= got


def test_uneven_sections_and_int_forms():
    got = space_timesteps(100, [3, 5, 7])  # portions of 34, 33, 33 steps
    assert got == expected_sections(100, [3, 5, 7])
    assert {0, 33, 34, 66, 67, 99} <= got
    assert space_timesteps(100, 10) == space_timesteps(100, "10") == space_timesteps(100, [10])
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(30, "5,20")


def test_ddim_strides():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(4000, "ddim250") == set(range(0, 4000, 16))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    with pytest.raises(ValueError, match="999"):
        space_timesteps(1000, "ddim999")  # stride 1 gives 1000, stride 2 gives 500


def _spaced(use, T=1000, schedule="linear", **kw):
    args = dict(
        betas=get_named_beta_schedule(schedule, T),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.RESCALED_MSE,
    )
    args.update(kw)
    return SpacedDiffusion(use_timesteps=use, **args), GaussianDiffusion(**args)


@pytest.mark.parametrize("schedule,T,spec", [("linear", 1000, "ddim50"), ("cosine", 4000, "250"),
                                             ("linear", 300, "10,15,20")])
def test_rebuilt_betas_keep_alpha_bar(schedule, T, spec):
    use = space_timesteps(T, spec)
    spaced, base = _spaced(use, T=T, schedule=schedule)
    kept = sorted(use)
    assert spaced.timestep_map == kept
    assert spaced.num_timesteps == len(kept) and spaced.original_num_steps == T
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), base.alphas_cumprod[kept], rtol=1e-12)
    assert (spaced.betas > 0).all() and (spaced.betas <= 1).all()


class RecordingModel(torch.nn.Module):
    def __init__(self, out_channels=6):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))
        self.out_channels = out_channels
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.scale * torch.cat([x, torch.zeros_like(x)], 1)[:, : self.out_channels]


@pytest.mark.parametrize("rescale", [False, True])
def test_wrapped_model_sees_original_timesteps(rescale):
    T = 1000
    use = space_timesteps(T, "ddim10")
    spaced, _ = _spaced(use, T=T, rescale_timesteps=rescale)
    model = RecordingModel()
    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 4, 9])
    mapped = torch.tensor([0, 400, 900])
    want = mapped.float() * (1000.0 / T) if rescale else mapped

    spaced.p_mean_variance(model, x, t)
    spaced.training_losses(model, x.clamp(-1, 1), t)
    spaced.heldout_loss_terms(model, x.clamp(-1, 1), t, torch.randn_like(x))
    got_grad = []
    spaced.condition_mean(lambda a, ts: got_grad.append(ts) or torch.zeros_like(a),
                          spaced.p_mean_variance(model, x, t), x, t)
    for seen in model.seen + got_grad:
        torch.testing.assert_close(seen, want)

    # a full loop takes exactly the kept steps, in descending order
    model.seen.clear()
    out = spaced.ddim_sample_loop(model, (2, 3, 4, 4))
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    steps = [int(s[0]) for s in model.seen]
    base_steps = [int(round(v * T / 1000)) for v in steps] if rescale else steps
    assert base_steps == sorted(use, reverse=True)


def test_rescale_with_full_steps_is_identity_mapping():
    """Respacing to all steps reproduces the base process exactly."""
    T = 50
    spaced, base = _spaced(range(T), T=T, schedule="cosine")
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-12)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 30])
    noise = torch.randn_like(x0)
    m1, m2 = RecordingModel(), RecordingModel()
    a = spaced.training_losses(m1, x0, t, noise=noise)
    b = base.training_losses(m2, x0, t, noise=noise)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_min_snr_passes_through():
    T = 1000
    use = space_timesteps(T, "100")
    spaced, base = _spaced(use, T=T, min_snr_gamma=5.0)
    assert spaced.min_snr_gamma == 5.0
    kept = torch.tensor(sorted(use))
    torch.testing.assert_close(
        spaced.min_snr_weights(torch.arange(100)), base.min_snr_weights(kept)
    )


def test_spaced_diffusion_deepcopies_and_pickles():
    import copy
    import pickle

    spaced, _ = _spaced(space_timesteps(100, "10"), T=100)
    spaced.p_mean_variance(RecordingModel(), torch.randn(1, 3, 2, 2), torch.tensor([3]))
    for clone in (copy.deepcopy(spaced), pickle.loads(pickle.dumps(spaced))):
        assert clone.timestep_map == spaced.timestep_map
        np.testing.assert_array_equal(clone.betas, spaced.betas)


def test_heldout_loss_terms_of_kept_steps_match_the_base_process():
    """A kept step has the base process's alpha_bar: the noise MSE is the base's at the mapped
    step, the prior the KL at the last kept step."""
    T = 1000
    use = space_timesteps(T, "ddim10")
    spaced, base = _spaced(use, T=T)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    got = spaced.heldout_loss_terms(RecordingModel(), x0, torch.tensor([0, 4, 9]), noise)
    want = base.heldout_loss_terms(RecordingModel(), x0, torch.tensor([0, 400, 900]), noise)
    torch.testing.assert_close(got["eps_mse"], want["eps_mse"], rtol=1e-5, atol=1e-7)
    # the prior is KL(q(x_T | x_0) || N(0, I)) at the last kept step, base step 900
    ab = base.alphas_cumprod[900]
    mean = np.sqrt(ab) * x0.double()
    kl = 0.5 * (-np.log(1 - ab) + (1 - ab) + mean**2 - 1)
    torch.testing.assert_close(
        got["prior_bpd"].double(), kl.mean(dim=(1, 2, 3)) / np.log(2.0), rtol=1e-5, atol=1e-7
    )
