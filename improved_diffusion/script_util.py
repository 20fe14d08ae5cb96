"""
Defaults and factories for models and diffusions, with the original API.

`model_and_diffusion_defaults()` gives the model/diffusion flags of the options table
(`improved_diffusion/options/config.py`): improved-diffusion's keys and default values, plus
guided-diffusion's extra model keys at values that reproduce the improved-diffusion
architecture. The original API is unchanged: `add_dict_to_argparser`, `args_to_dict`,
`create_model_and_diffusion(**options)`. String flags (`attention_resolutions`,
`channel_mult`) are parsed here, once.
"""

import os
import sys

from .options import config
from . import methods
from . import gaussian_diffusion as gd
from .options.config import str2bool  # noqa: F401  (the original API's home of str2bool)
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

# Number of classes of a class-conditional model (ImageNet), as in the original.
NUM_CLASSES = 1000

# channel_mult used when the flag is empty, by image size (guided-diffusion's table
# plus improved-diffusion's 32x32 entry).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

# The super-resolution models' tables, by output (large) size.
SR_CHANNEL_MULT = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}

# Options accepted by the factories beside the defaults' keys (docs/design.md): these and
# the options of every registered loss weighting (improved_diffusion/methods/).
_EXTRA_OPTIONS = ("class_dropout_prob", "image_channels")


def model_and_diffusion_defaults():
    """
    Default model and diffusion flags for image training.

    improved-diffusion's keys with its values, plus guided-diffusion's model keys
    set so that the architecture is improved-diffusion's.
    """
    return config.defaults(*config.MODEL_GROUPS)


def sr_model_and_diffusion_defaults():
    """
    Default flags for the super-resolution model (guided-diffusion's key set).
    """
    res = model_and_diffusion_defaults()
    for key in ("image_size", "channel_mult", "sigma_small", "use_new_attention_order"):
        del res[key]
    return {**{o.name: o.default for o in config.TOOLS["super_res"].values()}, **res}


def _merge_options(kwargs, defaults, caller):
    """
    Defaults overridden by `kwargs`; unknown keys are an error, not ignored.
    """
    extra = _EXTRA_OPTIONS + methods.option_names(methods.WEIGHTING)
    allowed = {**defaults, **{k: config.BY_NAME[k].default for k in extra}}
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{caller}() got unknown option(s): {', '.join(unknown)}")
    return {**allowed, **kwargs}


def _diffusion_kwargs(opts):
    return dict(
        steps=opts["diffusion_steps"],
        learn_sigma=opts["learn_sigma"],
        sigma_small=opts.get("sigma_small", False),
        noise_schedule=opts["noise_schedule"],
        use_kl=opts["use_kl"],
        predict_xstart=opts["predict_xstart"],
        rescale_timesteps=opts["rescale_timesteps"],
        rescale_learned_sigmas=opts["rescale_learned_sigmas"],
        timestep_respacing=opts["timestep_respacing"],
        loss_weighting=methods.loss_weighting(opts),
    )


def create_diffusion_from_options(opts, **overrides):
    """The diffusion of a model/diffusion options dict, e.g. respaced for sampling:
    `create_diffusion_from_options(opts, timestep_respacing="ddim50")`."""
    merged = _merge_options(dict(opts), model_and_diffusion_defaults(), "create_diffusion_from_options")
    return create_gaussian_diffusion(**{**_diffusion_kwargs(merged), **overrides})


def create_model_and_diffusion(**kwargs):
    """
    Build the UNet and the (spaced) diffusion from flat flags.

    Takes the keys of `model_and_diffusion_defaults()` (missing ones take their
    default) plus `class_dropout_prob`, `image_channels` and the options of the loss
    weightings (`min_snr_gamma`, `p2_gamma`, `p2_k`, ...); any other key raises TypeError.

    :return: a tuple (model, diffusion).
    """
    opts = _merge_options(
        kwargs, model_and_diffusion_defaults(), "create_model_and_diffusion"
    )
    # The diffusion first: it is cheap, so a bad diffusion flag fails before a
    # large model is allocated.
    diffusion = create_gaussian_diffusion(**_diffusion_kwargs(opts))
    model = create_model(
        opts["image_size"],
        opts["num_channels"],
        opts["num_res_blocks"],
        channel_mult=opts["channel_mult"],
        learn_sigma=opts["learn_sigma"],
        class_cond=opts["class_cond"],
        use_checkpoint=opts["use_checkpoint"],
        attention_resolutions=opts["attention_resolutions"],
        num_heads=opts["num_heads"],
        num_head_channels=opts["num_head_channels"],
        num_heads_upsample=opts["num_heads_upsample"],
        use_scale_shift_norm=opts["use_scale_shift_norm"],
        dropout=opts["dropout"],
        resblock_updown=opts["resblock_updown"],
        use_fp16=opts["use_fp16"],
        use_new_attention_order=opts["use_new_attention_order"],
        class_dropout_prob=opts["class_dropout_prob"],
        image_channels=opts["image_channels"],
    )
    return model, diffusion


def parse_channel_mult(
    channel_mult, image_size, table=DEFAULT_CHANNEL_MULT, size_flag="image_size"
):
    """
    Turn the `channel_mult` flag into a tuple of multipliers.

    :param channel_mult: "" (pick by image size), a string like "1,2,2,2", or a
        sequence of numbers.
    :param image_size: the image size, used when `channel_mult` is empty.
    :return: a tuple of ints (floats where a multiplier is fractional, e.g. 0.5).
    """
    if channel_mult in ("", None):
        if image_size not in table:
            sizes = ", ".join(str(s) for s in sorted(table))
            raise ValueError(
                f"no default channel_mult for {size_flag}={image_size} (defaults "
                f"exist for {sizes}); pass channel_mult, e.g. \"1,2,2\""
            )
        return tuple(table[image_size])
    if isinstance(channel_mult, str):
        try:
            values = [float(part) for part in channel_mult.split(",")]
        except ValueError:
            raise ValueError(
                f"channel_mult must be comma-separated numbers, got {channel_mult!r}"
            ) from None
    else:
        values = [float(part) for part in channel_mult]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"channel_mult must be positive numbers, got {channel_mult!r}")
    return tuple(int(v) if v.is_integer() else v for v in values)


def parse_attention_resolutions(attention_resolutions, image_size, num_levels):
    """
    Turn the `attention_resolutions` flag (resolutions in pixels) into downsample
    rates, checking that the UNet reaches each of them.

    :param attention_resolutions: a string like "32,16,8", or a sequence of ints.
    :param image_size: the input resolution.
    :param num_levels: number of UNet levels (len(channel_mult)).
    :return: a tuple of downsample rates (image_size // resolution).
    """
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                "attention_resolutions must be comma-separated integers, got "
                f"{attention_resolutions!r}"
            ) from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    reachable = [image_size // 2**level for level in range(num_levels)]
    rates = []
    for res in resolutions:
        if res <= 0 or image_size % res or res not in reachable:
            raise ValueError(
                f"attention_resolutions: resolution {res} is never reached by a "
                f"{image_size}px model with {num_levels} levels (its resolutions: "
                f"{', '.join(str(r) for r in reachable)})"
            )
        rates.append(image_size // res)
    return tuple(rates)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    *,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=None,
    class_dropout_prob=0.0,
    image_channels=3,
):
    """
    Build a UNetModel from the flags (guided-diffusion's signature and defaults).

    :param channel_mult: "" to choose by image size, or e.g. "1,2,2,2".
    :param attention_resolutions: resolutions in pixels, e.g. "32,16,8".
    :param learn_sigma: if True, output 2 x image_channels (mean and variance).
    :param class_cond: if True, condition on `num_classes` labels.
    :param num_classes: classes of a class-conditional model; default NUM_CLASSES.
    :param class_dropout_prob: classifier-free guidance training (UNetModel); > 0
        adds the null-label row.
    :param image_channels: 1 (grey), 3 (RGB) or 4 (RGBA).
    Other parameters are those of UNetModel.
    """
    channel_mult = parse_channel_mult(channel_mult, image_size)
    attention_ds = parse_attention_resolutions(
        attention_resolutions, image_size, len(channel_mult)
    )
    if num_classes is None:
        num_classes = NUM_CLASSES
    return UNetModel(
        image_size=image_size,
        in_channels=image_channels,
        model_channels=num_channels,
        out_channels=(2 * image_channels if learn_sigma else image_channels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        class_dropout_prob=class_dropout_prob,
    )


def sr_create_model_and_diffusion(**kwargs):
    """
    Build the super-resolution UNet and its diffusion from flat flags.

    Takes the keys of `sr_model_and_diffusion_defaults()` plus the loss weightings' options,
    `image_channels` and `channel_mult` (not an original flag: "" picks guided-diffusion's
    multipliers by `large_size`, which exist for 64, 256 and 512 only).

    :return: a tuple (model, diffusion).
    """
    opts = _merge_options(
        kwargs,
        {**sr_model_and_diffusion_defaults(), "channel_mult": ""},
        "sr_create_model_and_diffusion",
    )
    diffusion = create_gaussian_diffusion(**_diffusion_kwargs(opts))
    model = sr_create_model(
        opts["large_size"],
        opts["small_size"],
        opts["num_channels"],
        opts["num_res_blocks"],
        learn_sigma=opts["learn_sigma"],
        class_cond=opts["class_cond"],
        use_checkpoint=opts["use_checkpoint"],
        attention_resolutions=opts["attention_resolutions"],
        num_heads=opts["num_heads"],
        num_head_channels=opts["num_head_channels"],
        num_heads_upsample=opts["num_heads_upsample"],
        use_scale_shift_norm=opts["use_scale_shift_norm"],
        dropout=opts["dropout"],
        resblock_updown=opts["resblock_updown"],
        use_fp16=opts["use_fp16"],
        channel_mult=opts["channel_mult"],
        image_channels=opts["image_channels"],
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    *,
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    num_classes=None,
    channel_mult="",
    image_channels=3,
):
    """
    Build a SuperResModel that upsamples `small_size` images to `large_size`.

    :param channel_mult: "" for guided-diffusion's multipliers by `large_size`, or
        e.g. "1,2,2" for other sizes.
    """
    if not 0 < small_size <= large_size:
        raise ValueError(
            f"small_size must be in [1, large_size={large_size}], got {small_size}"
        )
    channel_mult = parse_channel_mult(channel_mult, large_size, SR_CHANNEL_MULT, "large_size")
    attention_ds = parse_attention_resolutions(
        attention_resolutions, large_size, len(channel_mult)
    )
    if num_classes is None:
        num_classes = NUM_CLASSES
    return SuperResModel(
        image_size=large_size,
        in_channels=image_channels,
        model_channels=num_channels,
        out_channels=(2 * image_channels if learn_sigma else image_channels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    loss_weighting=None,
    **weighting_options,
):
    """
    Build a SpacedDiffusion from flags, mapping them to the diffusion enums exactly
    as the original does.

    :param steps: number of diffusion steps T.
    :param learn_sigma: the model predicts the variance (LEARNED_RANGE).
    :param sigma_small: with fixed variance, use the posterior variance
        (FIXED_SMALL) instead of beta (FIXED_LARGE).
    :param noise_schedule: "linear" or "cosine".
    :param use_kl: train on the variational bound (RESCALED_KL).
    :param predict_xstart: the model predicts x_0 instead of the noise.
    :param rescale_timesteps: feed the model timesteps scaled to [0, 1000).
    :param rescale_learned_sigmas: use RESCALED_MSE (the hybrid loss) instead of MSE.
    :param timestep_respacing: sampling steps to keep, e.g. "250" or "ddim50"; ""
        keeps all `steps`.
    :param loss_weighting: the loss weightings of the MSE term (`methods.loss_weighting(options)`);
        None: unweighted.
    :param weighting_options: or their options as keywords, e.g. min_snr_gamma=5.0 or
        p2_gamma=1.0, p2_k=1.0 (improved_diffusion/methods/); an unknown keyword is a TypeError.
    """
    try:
        betas = gd.get_named_beta_schedule(noise_schedule, steps)
    except (NotImplementedError, KeyError) as err:
        raise ValueError(f"unknown noise_schedule: {noise_schedule!r}") from err
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    if predict_xstart:
        model_mean_type = gd.ModelMeanType.START_X
    else:
        model_mean_type = gd.ModelMeanType.EPSILON
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        loss_weighting=loss_weighting,
        **weighting_options,
    )


def add_dict_to_argparser(parser, default_dict, help_text=None):
    """
    Add a `--key` flag for every entry of `default_dict`, typed by its default.

    Booleans parse through `str2bool` (`--learn_sigma True`), a None default
    parses as a string.

    :param parser: an argparse.ArgumentParser.
    :param default_dict: flag names and default values.
    :param help_text: optional {key: help} overriding the options table's.
    """
    helps = {o.name: o.help for o in config.OPTIONS}
    helps.update(help_text or {})
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        text = helps.get(key, "")
        text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        parser.add_argument(f"--{key}", default=value, type=value_type, help=text)


def args_to_dict(args, keys):
    """
    Pick `keys` out of an argparse namespace into a dict.
    """
    return {k: getattr(args, k) for k in keys}


def run_main(main, errors=(ValueError, FileNotFoundError)):
    """
    Run a script's `main()`: a user error (bad flag, missing file, ...) prints one `error:`
    line and exits 2, a collective past --dist_timeout one line and exits 1, with the
    traceback only when IMPROVED_DIFFUSION_DEBUG is set.
    """
    from . import dist_util

    try:
        return main()
    except errors as e:
        if os.environ.get("IMPROVED_DIFFUSION_DEBUG"):
            raise
        print(f"error: {e}\n(set IMPROVED_DIFFUSION_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        message = dist_util.timeout_message(e)
        if message is None or os.environ.get("IMPROVED_DIFFUSION_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: tearing the process group down would wait for the missing rank again


# ---------------------------------------------------------------------------------------
# The noise-aware classifier (guided-diffusion)
# ---------------------------------------------------------------------------------------

# Classifier flags beyond guided-diffusion's (the table's classifier group, in_defaults=False);
# their defaults build its classifier. The originals' multiplier table has no entry below 64
# pixels, 64 channels per attention head is more than a small classifier has, and its head
# always has 1000 logits.
CLASSIFIER_EXTRA_DEFAULTS = {o.name: o.default for o in config.TOOLS["classifier"].values() if not o.in_defaults}


def diffusion_defaults():
    """
    Default diffusion flags (guided-diffusion's key set: the table's diffusion group
    without `sigma_small`), at the table's values.
    """
    res = config.defaults("diffusion")
    del res["sigma_small"]
    return res


def classifier_defaults():
    """
    Default flags of the noise-aware classifier, guided-diffusion's keys and values: the
    table's image_size and its classifier group.
    """
    return {"image_size": config.BY_NAME["image_size"].default,
            **{o.name: o.default for o in config.TOOLS["classifier"].values() if o.in_defaults}}


def classifier_and_diffusion_defaults():
    """
    The classifier's flags and those of the diffusion that noises its inputs.
    """
    return {**classifier_defaults(), **diffusion_defaults()}


def create_classifier_and_diffusion(**kwargs):
    """
    Build the classifier and its diffusion from flat flags: the keys of
    `classifier_and_diffusion_defaults()` plus those of `CLASSIFIER_EXTRA_DEFAULTS`
    (missing ones take their default); any other key raises TypeError.

    :return: a tuple (classifier, diffusion).
    """
    defaults = {**classifier_and_diffusion_defaults(), **CLASSIFIER_EXTRA_DEFAULTS}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"create_classifier_and_diffusion() got unknown option(s): {', '.join(unknown)}")
    opts = {**defaults, **kwargs}
    diffusion = create_gaussian_diffusion(
        steps=opts["diffusion_steps"],
        learn_sigma=opts["learn_sigma"],
        noise_schedule=opts["noise_schedule"],
        use_kl=opts["use_kl"],
        predict_xstart=opts["predict_xstart"],
        rescale_timesteps=opts["rescale_timesteps"],
        rescale_learned_sigmas=opts["rescale_learned_sigmas"],
        timestep_respacing=opts["timestep_respacing"],
    )
    classifier = create_classifier(**{k: opts[k] for k in (*classifier_defaults(), *CLASSIFIER_EXTRA_DEFAULTS)})
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    *,
    classifier_channel_mult="",
    classifier_num_head_channels=64,
    classifier_num_classes=NUM_CLASSES,
):
    """
    Build guided-diffusion's classifier (an EncoderUNetModel on 3-channel images).

    :param classifier_width: base channel count.
    :param classifier_depth: residual blocks per resolution.
    :param classifier_attention_resolutions: resolutions in pixels, e.g. "32,16,8".
    :param classifier_pool: the head: adaptive, attention, spatial or spatial_v2.
    :param classifier_channel_mult: "" to choose by image size, or e.g. "1,2,2".
    :param classifier_num_head_channels: channels per attention head.
    :param classifier_num_classes: number of logits.
    Other parameters are EncoderUNetModel's.
    """
    channel_mult = parse_channel_mult(classifier_channel_mult, image_size)
    attention_ds = parse_attention_resolutions(
        classifier_attention_resolutions, image_size, len(channel_mult)
    )
    if classifier_num_classes < 1:
        raise ValueError(f"classifier_num_classes must be at least 1, got {classifier_num_classes}")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=classifier_num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_ds,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=classifier_num_head_channels,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )
