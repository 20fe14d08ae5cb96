"""
Tests of the flag defaults and factories: pinned defaults, the SPEC's reference
configurations through the public factory, flag-to-enum mapping, string parsing,
errors that name the flag, and the argparse round trip.
"""

import argparse

import pytest
import torch

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion import script_util as su
from improved_diffusion.respace import SpacedDiffusion
from improved_diffusion.unet import SuperResModel, UNetModel

PINNED_DEFAULTS = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    num_head_channels=-1,
    channel_mult="",
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)

CIFAR10_FLAGS = dict(
    image_size=32,
    num_channels=128,
    num_res_blocks=3,
    learn_sigma=True,
    dropout=0.3,
    diffusion_steps=4000,
    noise_schedule="cosine",
)
IMAGENET128_FLAGS = dict(
    attention_resolutions="32,16,8",
    class_cond=True,
    diffusion_steps=1000,
    image_size=128,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_heads=4,
    num_res_blocks=2,
    resblock_updown=True,
    use_scale_shift_norm=True,
)

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", num_heads=2, diffusion_steps=20,
            noise_schedule="cosine")


def flags(**overrides):
    opts = su.model_and_diffusion_defaults()
    opts.update(overrides)
    return opts


def test_defaults_are_pinned():
    defaults = su.model_and_diffusion_defaults()
    assert defaults == PINNED_DEFAULTS
    assert all(type(defaults[k]) is type(v) for k, v in PINNED_DEFAULTS.items())
    assert "min_snr_gamma" not in defaults
    assert su.NUM_CLASSES == 1000
    # A fresh dict every call: callers mutate it.
    defaults["image_size"] = 1
    assert su.model_and_diffusion_defaults()["image_size"] == 64


def test_sr_defaults():
    sr = su.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64
    assert "image_size" not in sr and "channel_mult" not in sr
    for key in ("num_head_channels", "resblock_updown", "use_fp16", "learn_sigma"):
        assert sr[key] == PINNED_DEFAULTS[key]


@pytest.mark.parametrize(
    "overrides, params, entries",
    [(CIFAR10_FLAGS, 52_546_438, 446), (IMAGENET128_FLAGS, 421_529_606, 493)],
    ids=["cifar10", "imagenet128"],
)
def test_reference_configs_through_factory(overrides, params, entries):
    with torch.device("meta"):
        model, diffusion = su.create_model_and_diffusion(**flags(**overrides))
    sd = model.state_dict()
    assert len(sd) == entries
    assert sum(v.numel() for v in sd.values()) == params
    assert model.out_channels == 6
    assert diffusion.num_timesteps == overrides["diffusion_steps"]
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert diffusion.loss_type == gd.LossType.RESCALED_MSE


def test_reference_configs_derived_arguments():
    with torch.device("meta"):
        cifar = su.create_model(32, 128, 3, learn_sigma=True, dropout=0.3,
                                attention_resolutions="16,8", num_heads=4,
                                use_scale_shift_norm=True)
        imagenet = su.create_model(128, 256, 2, learn_sigma=True, class_cond=True,
                                   attention_resolutions="32,16,8", num_heads=4,
                                   resblock_updown=True, use_scale_shift_norm=True)
    assert cifar.channel_mult == (1, 2, 2, 2)
    assert cifar.attention_resolutions == (2, 4)
    assert cifar.num_classes is None and cifar.dropout == 0.3
    assert imagenet.channel_mult == (1, 1, 2, 3, 4)
    assert imagenet.attention_resolutions == (4, 8, 16)
    assert imagenet.num_classes == 1000


@pytest.mark.parametrize(
    "size, mult",
    [(512, (0.5, 1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)),
     (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2))],
)
def test_channel_mult_by_image_size(size, mult):
    with torch.device("meta"):
        model = su.create_model(size, 64, 1, attention_resolutions=str(size // 2))
    assert model.channel_mult == mult
    assert model.image_size == size


def test_channel_mult_string_and_attention_rates():
    with torch.device("meta"):
        model = su.create_model(48, 64, 1, channel_mult="1,2,2", attention_resolutions="24,12")
    assert model.channel_mult == (1, 2, 2)
    assert model.attention_resolutions == (2, 4)
    assert su.parse_channel_mult("0.5,1,2", 64) == (0.5, 1, 2)
    assert su.parse_channel_mult((1, 2), 64) == (1, 2)
    assert su.parse_attention_resolutions("", 32, 4) == ()
    assert su.parse_attention_resolutions([16, 8], 32, 4) == (2, 4)


def test_learn_sigma_and_class_cond():
    with torch.device("meta"):
        plain = su.create_model(32, 64, 1)
        sigma = su.create_model(32, 64, 1, learn_sigma=True)
        cond = su.create_model(32, 64, 1, class_cond=True)
        cond10 = su.create_model(32, 64, 1, class_cond=True, num_classes=10)
        ignored = su.create_model(32, 64, 1, num_classes=10)
    assert plain.out_channels == 3 and sigma.out_channels == 6
    assert cond.label_emb.weight.shape == (su.NUM_CLASSES, 256)
    assert cond10.label_emb.weight.shape == (10, 256)
    assert ignored.num_classes is None


def test_guided_flags_reach_the_model():
    with torch.device("meta"):
        model, _ = su.create_model_and_diffusion(**flags(
            **TINY, num_head_channels=16, use_new_attention_order=True,
            resblock_updown=True, use_fp16=True, use_checkpoint=True,
            use_scale_shift_norm=False, num_heads_upsample=1,
        ))
    attn = model.middle_block[1]
    assert attn.num_heads == 64 // 16
    assert type(attn.attention).__name__ == "QKVAttention"
    assert model.use_fp16 and model.use_checkpoint
    assert model.input_blocks[2][0].updown
    assert not model.middle_block[0].use_scale_shift_norm


def test_tiny_model_and_diffusion_run():
    model, diffusion = su.create_model_and_diffusion(**flags(**TINY, learn_sigma=True))
    assert isinstance(model, UNetModel) and isinstance(diffusion, SpacedDiffusion)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([0, 19]))
    assert out.shape == (2, 6, 8, 8)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="not_a_flag"):
        su.create_model_and_diffusion(**flags(not_a_flag=1))
    with pytest.raises(TypeError, match="image_size"):
        su.sr_create_model_and_diffusion(image_size=64)


def test_min_snr_gamma_is_forwarded():
    _, diffusion = su.create_model_and_diffusion(**flags(**TINY), min_snr_gamma=5.0)
    assert diffusion.min_snr_gamma == 5.0
    _, diffusion = su.create_model_and_diffusion(**flags(**TINY))
    assert diffusion.min_snr_gamma == 0.0


@pytest.mark.parametrize(
    "kwargs, mean, var, loss",
    [
        (dict(), "EPSILON", "FIXED_LARGE", "MSE"),
        (dict(sigma_small=True), "EPSILON", "FIXED_SMALL", "MSE"),
        (dict(learn_sigma=True, sigma_small=True), "EPSILON", "LEARNED_RANGE", "MSE"),
        (dict(learn_sigma=True, rescale_learned_sigmas=True),
         "EPSILON", "LEARNED_RANGE", "RESCALED_MSE"),
        (dict(use_kl=True, rescale_learned_sigmas=True), "EPSILON", "FIXED_LARGE", "RESCALED_KL"),
        (dict(predict_xstart=True), "START_X", "FIXED_LARGE", "MSE"),
    ],
)
def test_diffusion_flag_mapping(kwargs, mean, var, loss):
    diffusion = su.create_gaussian_diffusion(steps=100, **kwargs)
    assert diffusion.model_mean_type == gd.ModelMeanType[mean]
    assert diffusion.model_var_type == gd.ModelVarType[var]
    assert diffusion.loss_type == gd.LossType[loss]
    assert diffusion.num_timesteps == 100
    assert diffusion.rescale_timesteps is False


def test_respacing_and_schedules():
    full = su.create_gaussian_diffusion(steps=4000, noise_schedule="cosine")
    assert full.num_timesteps == 4000
    assert full.use_timesteps == set(range(4000))
    spaced = su.create_gaussian_diffusion(steps=1000, timestep_respacing="250",
                                          rescale_timesteps=True)
    assert spaced.num_timesteps == 250 and spaced.rescale_timesteps is True
    assert su.create_gaussian_diffusion(steps=1000, timestep_respacing="ddim50").num_timesteps == 50
    # Through the flat factory, the improved-diffusion defaults apply.
    _, diffusion = su.create_model_and_diffusion(**flags(**TINY, timestep_respacing="10"))
    assert diffusion.num_timesteps == 10 and diffusion.rescale_timesteps is True


# ---------------------------------------------------------------------------
# Errors that name the flag


def test_unknown_noise_schedule():
    with pytest.raises(ValueError, match="noise_schedule"):
        su.create_gaussian_diffusion(noise_schedule="quadratic")
    with pytest.raises(ValueError, match="noise_schedule"):
        su.create_model_and_diffusion(**flags(**dict(TINY, noise_schedule="sqrt")))


def test_unsupported_image_size_needs_channel_mult():
    with pytest.raises(ValueError, match="channel_mult"):
        su.create_model(48, 64, 1)
    with pytest.raises(ValueError, match="channel_mult"):
        su.create_model(64, 64, 1, channel_mult="1,x")
    with pytest.raises(ValueError, match="large_size"):
        su.sr_create_model(100, 25, 64, 1)


@pytest.mark.parametrize("res", ["64", "3", "12", "16,5"])
def test_unreachable_attention_resolution(res):
    # 32px with channel_mult (1,2,2,2) has resolutions 32, 16, 8, 4.
    with pytest.raises(ValueError, match="attention_resolutions"):
        su.create_model(32, 64, 1, attention_resolutions=res)


def test_head_errors_through_factory():
    with pytest.raises(ValueError, match="num_heads"):
        su.create_model(32, 64, 1, attention_resolutions="16", num_heads=3)
    with pytest.raises(ValueError, match="num_head_channels"):
        su.create_model(32, 64, 1, attention_resolutions="16", num_head_channels=48)


# ---------------------------------------------------------------------------
# Super-resolution


def test_sr_factory():
    model, diffusion = su.sr_create_model_and_diffusion(
        large_size=64, small_size=16, num_channels=32, num_res_blocks=1,
        attention_resolutions="8", num_heads=1, diffusion_steps=10,
        noise_schedule="cosine",
    )
    assert isinstance(model, SuperResModel)
    assert model.channel_mult == (1, 2, 3, 4) and model.in_channels == 6
    assert diffusion.num_timesteps == 10


# ---------------------------------------------------------------------------
# Command line


def make_parser(defaults):
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    return parser


def test_argparse_round_trip():
    defaults = dict(su.model_and_diffusion_defaults(), extra=None)
    parser = make_parser(defaults)
    args = parser.parse_args([])
    assert su.args_to_dict(args, defaults.keys()) == defaults

    args = parser.parse_args([
        "--image_size", "32", "--learn_sigma", "True", "--use_kl", "no",
        "--dropout", "0.3", "--attention_resolutions", "32,16,8", "--extra", "x",
        "--rescale_timesteps", "False",
    ])
    got = su.args_to_dict(args, defaults.keys())
    assert got["image_size"] == 32 and isinstance(got["image_size"], int)
    assert got["learn_sigma"] is True and got["use_kl"] is False
    assert got["rescale_timesteps"] is False
    assert got["dropout"] == 0.3 and got["attention_resolutions"] == "32,16,8"
    assert got["extra"] == "x"
    # The flags build a model directly.
    with torch.device("meta"):
        su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults()))


def test_help_text():
    text = make_parser(su.model_and_diffusion_defaults()).format_help()
    assert "--use_scale_shift_norm" in text and "FiLM" in text
    assert "default: 16,8" in text


@pytest.mark.parametrize("text, value", [
    ("True", True), ("yes", True), ("1", True), ("t", True), ("Y", True),
    ("False", False), ("no", False), ("0", False), ("f", False), ("N", False),
])
def test_str2bool(text, value):
    assert su.str2bool(text) is value
    assert su.str2bool(value) is value


def test_str2bool_error_is_a_clear_argparse_error(capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="boolean"):
        su.str2bool("maybe")
    parser = make_parser(dict(learn_sigma=False))
    with pytest.raises(SystemExit):
        parser.parse_args(["--learn_sigma", "maybe"])
    err = capsys.readouterr().err
    assert "--learn_sigma" in err and "maybe" in err
