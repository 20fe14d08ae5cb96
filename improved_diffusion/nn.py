"""
Small layer helpers shared by the UNet and the diffusion code.

The names and behaviour follow the original improved-diffusion / guided-diffusion
`nn.py`, so code written against those modules keeps working. Two things changed on
purpose: `checkpoint` uses PyTorch's non-reentrant activation checkpointing (it
replays autocast state, the hand-written original did not), and `GroupNorm32`
always normalises in float32 whatever precision surrounds it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# Kept so that `from improved_diffusion.nn import SiLU` (improved-diffusion) still works.
SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm that computes its statistics in float32 (float64 for float64 inputs) and
    returns the input dtype.

    Variance over a group of a half-precision activation loses most of its digits;
    doing the reduction in float32 is what keeps fp16/bf16 training stable.

    Under torch.compile it computes the same on views (`group_norm_float32`), so that the
    compiler fuses the casts into its kernels and channels-last stays channels-last; eagerly
    it runs PyTorch's kernel on a float32 copy, as the original does.
    """

    def forward(self, x):
        if torch.compiler.is_compiling():
            return group_norm_float32(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def group_norm_float32(x, num_groups, weight=None, bias=None, eps=1e-5):
    """
    GroupNorm with its statistics and arithmetic in float32 (float64 for float64 inputs),
    returning the input dtype: GroupNorm32's numbers, up to the order of a float32 sum.

    Written with views and element-wise ops instead of a float32 copy and PyTorch's kernel,
    because that kernel returns NCHW for a channels-last input and its reference splits the
    groups with a reshape that copies: here the groups are a view (N, G, C/G, ...) in any
    memory layout, the output keeps the input's layout, and a compiler turns the whole into
    a reduction and one element-wise kernel (taking the SiLU that follows, in the UNet).
    """
    channels = x.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    groups = x.unflatten(1, (num_groups, channels // num_groups)).to(compute)
    var, mean = torch.var_mean(groups, dim=tuple(range(2, groups.dim())), keepdim=True, correction=0)
    out = ((groups - mean) * torch.rsqrt(var + eps)).flatten(1, 2)
    shape = (1, channels) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.to(compute).view(shape)
    if bias is not None:
        out = out + bias.to(compute).view(shape)
    return out.to(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D or 3D convolution; `dims` selects the signal dimensionality.
    """
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims must be 1, 2 or 3, got {dims}")


def linear(*args, **kwargs):
    """
    Create a linear layer (a named factory so every layer type goes through one place).
    """
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D or 3D average pooling layer.
    """
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"dims must be 1, 2 or 3, got {dims}")


def update_ema(target_params, source_params, rate=0.99):
    """
    Move `target_params` towards `source_params` by an exponential moving average.

    Kept for code written against the original API; the training loop has its own
    EMA object.

    :param target_params: the parameters to update in place.
    :param source_params: the parameters to follow.
    :param rate: the EMA decay (closer to 1 means slower).
    """
    with torch.no_grad():
        for targ, src in zip(target_params, source_params):
            targ.mul_(rate).add_(src, alpha=1 - rate)


def zero_module(module):
    """
    Zero the parameters of `module` and return it.

    Used on the last layer of every residual branch so each block starts as the
    identity, which is what makes deep UNets trainable from scratch.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """
    Multiply the parameters of `module` by `scale` and return it.
    """
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """
    Mean over every dimension except the batch dimension.
    """
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels):
    """
    The normalisation layer used throughout the UNet: GroupNorm, 32 groups, float32.

    :param channels: number of input channels (must be divisible by 32).
    :return: an nn.Module for normalisation.
    """
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000, dtype=torch.float32):
    """
    Sinusoidal timestep embeddings, cosines first then sines.

    The layout (cos half, then sin half, a zero column for odd `dim`) is part of the
    checkpoint format: released weights were trained on exactly this input.

    :param timesteps: a 1-D tensor of N timesteps, one per batch element; may be
        fractional (rescaled timesteps).
    :param dim: the size of each embedding.
    :param max_period: sets the lowest frequency of the embedding.
    :param dtype: the dtype the sinusoid is computed in (float64 for float64 models).
    :return: an [N x dim] tensor of embeddings, of `dtype`.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=dtype, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].to(dtype) * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """
    Run `func(*inputs)`, recomputing its activations in the backward pass if `flag`.

    Trades compute for memory. Uses PyTorch's non-reentrant checkpointing, which
    tracks parameters by itself (so `params` is accepted only for API
    compatibility) and replays autocast and RNG state, so dropout and bf16 give the
    same values in the recomputation.

    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: the parameters `func` uses; unused, kept for compatibility.
    :param flag: if False, just call `func`.
    """
    del params
    if flag:
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def convert_module_to_f16(module):
    """
    Cast a convolution's parameters to float16 (other module types are left alone).

    This is the original's rule for `use_fp16`: only convolutions go to half
    precision, while linear layers and norms stay in float32. Use with `Module.apply`.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """
    Undo `convert_module_to_f16`. Use with `Module.apply`.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def pointwise_conv_as_linear(conv, x):
    """
    Apply a kernel-size-1 `Conv1d` to a token tensor [N x T x C_in] as a matmul.

    The attention block keeps the original's Conv1d parameters (checkpoint
    compatibility) but works on [N x T x C] tokens, which are a free view of a
    channels-last activation; a 1x1 convolution is the same map as a linear layer.
    """
    return F.linear(x, conv.weight.flatten(1), conv.bias)
