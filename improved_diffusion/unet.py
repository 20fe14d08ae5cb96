"""
The denoising UNet of improved-diffusion / guided-diffusion.

One implementation covers both originals' flag sets. Module nesting and parameter
names are those of the originals, so released checkpoints load with `strict=True`:
`time_embed`, `label_emb`, `input_blocks`, `middle_block`, `output_blocks`, `out`,
and inside the blocks `in_layers`, `emb_layers`, `out_layers`, `skip_connection`,
`norm`, `qkv`, `proj_out`, `op` (downsample) and `conv` (upsample).

What differs from the originals is only how the arithmetic runs: attention goes
through `torch.nn.functional.scaled_dot_product_attention`, the attention block
works on [N x T x C] tokens (a free view of channels-last activations), and the
model runs under `torch.autocast` with norms and the timestep embedding in float32.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    linear,
    normalization,
    pointwise_conv_as_linear,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """
    A module whose forward() takes the timestep embedding as a second argument.
    """

    def forward(self, x, emb):
        """
        Apply the module to `x` given `emb` timestep embeddings.
        """
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A Sequential that hands the timestep embedding to the children that take one.

    Its children are numbered `0, 1, ...`, which is what puts indices like
    `input_blocks.1.0.` into the checkpoint's key names.
    """

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    :param channels: channels in the inputs.
    :param use_conv: if True, apply a convolution (parameter name `conv`) after
        upsampling.
    :param dims: signal dimensionality; for 3D, only the inner two dimensions are
        upsampled.
    :param out_channels: channels in the outputs (guided-diffusion); defaults to
        `channels`.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change channels")

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            size = (x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
            x = F.interpolate(x, size, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    2x downsampling by a strided 3x3 convolution or by average pooling.

    :param channels: channels in the inputs.
    :param use_conv: if True, use a strided convolution, else average pooling; the
        layer is called `op` either way.
    :param dims: signal dimensionality; for 3D, only the inner two dimensions are
        downsampled.
    :param out_channels: channels in the outputs (guided-diffusion); defaults to
        `channels`.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(
                dims, channels, self.out_channels, 3, stride=stride, padding=1
            )
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a convolution cannot change channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding, optionally changing the
    number of channels or the resolution.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the dropout probability.
    :param out_channels: the number of output channels; defaults to `channels`.
    :param use_conv: when the channel count changes, use a 3x3 convolution instead
        of a 1x1 convolution in the skip connection.
    :param use_scale_shift_norm: condition by `norm(h) * (1 + scale) + shift`
        (FiLM-like) instead of adding the embedding before the norm.
    :param dims: signal dimensionality.
    :param use_checkpoint: recompute activations in the backward pass.
    :param up: make this block a 2x upsampler (guided-diffusion `resblock_updown`).
    :param down: make this block a 2x downsampler.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        # Parameter-free resamplers; they only exist as attributes when used, as in
        # the original, and never add state-dict entries.
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(
                conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)
            ),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(
                dims, channels, self.out_channels, 3, padding=1
            )
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """
        Apply the block to `x` conditioned on `emb`.

        :param x: an [N x C x ...] tensor of features.
        :param emb: an [N x emb_channels] tensor of timestep embeddings.
        :return: an [N x out_channels x ...] tensor.
        """
        return checkpoint(self._forward, (x, emb), (), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the activation and the convolution, so the conv runs
            # at the new resolution; the skip path is resampled the same way.
            in_norm, in_act, in_conv = self.in_layers
            h = self.h_upd(in_act(in_norm(x)))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """
    Multi-head attention over a packed qkv tensor, heads split before q/k/v.

    This is improved-diffusion's layout (its `QKVAttention` plus the head reshape
    of its `AttentionBlock`): channel index = head * 3C + {q,k,v} * C + c. Released
    improved-diffusion checkpoints, and guided-diffusion ones trained without
    `use_new_attention_order`, need it.

    :param n_heads: the number of heads.
    """

    split_heads_first = True

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """
        Apply attention to a channels-first packed tensor.

        :param qkv: an [N x (3 * H * C) x T] tensor of queries, keys and values.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        return self.attend_tokens(qkv.transpose(1, 2)).transpose(1, 2)

    def attend_tokens(self, qkv):
        """
        Apply attention to a token-major packed tensor.

        :param qkv: an [N x T x (3 * H * C)] tensor, channels packed as in forward().
        :return: an [N x T x (H * C)] tensor; channel index = head * C + c.
        """
        batch, length, width = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(
                f"qkv width {width} is not divisible by 3 * num_heads ({self.n_heads})"
            )
        ch = width // (3 * self.n_heads)
        if self.split_heads_first:
            q, k, v = qkv.reshape(batch, length, self.n_heads, 3, ch).unbind(3)
        else:
            q, k, v = qkv.reshape(batch, length, 3, self.n_heads, ch).unbind(2)
        # SDPA's default scale 1/sqrt(C) is the original's (q C^-1/4)(k C^-1/4).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2).reshape(batch, length, self.n_heads * ch)


class QKVAttention(QKVAttentionLegacy):
    """
    Multi-head attention over a packed qkv tensor, q/k/v split before heads.

    guided-diffusion's `use_new_attention_order=True` layout: channel index =
    {q,k,v} * HC + head * C + c.

    :param n_heads: the number of heads.
    """

    split_heads_first = False


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions, with a residual connection.

    :param channels: the number of channels.
    :param num_heads: the number of heads, used when `num_head_channels` is -1.
    :param num_head_channels: if not -1, a fixed width per head (guided-diffusion);
        the number of heads is then `channels // num_head_channels`.
    :param use_checkpoint: recompute activations in the backward pass.
    :param use_new_attention_order: split q/k/v before heads (QKVAttention) rather
        than heads before q/k/v (QKVAttentionLegacy).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(
                    f"attention channels {channels} are not divisible by "
                    f"num_heads={num_heads}"
                )
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} are not divisible by "
                    f"num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        """
        :param x: an [N x C x ...] tensor.
        :return: a tensor of the same shape.
        """
        return checkpoint(self._forward, (x,), (), self.use_checkpoint)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        # GroupNorm over (C, *spatial) equals the original's norm over (C, T).
        # [N, T, C] tokens are a view of a channels-last activation, and the 1x1
        # Conv1d parameters act on them as plain matmuls.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = pointwise_conv_as_linear(self.qkv, tokens)
        h = self.attention.attend_tokens(qkv)
        h = pointwise_conv_as_linear(self.proj_out, h)
        return x + h.transpose(1, 2).reshape(batch, channels, *spatial)


def _encoder(in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
             resblock_updown, conv_resample, dims, res_block, attention):
    """
    The encoder that UNetModel and EncoderUNetModel share (the originals' `input_blocks`).

    :param res_block: (ch_in, ch_out, **kwargs) -> a ResBlock of the caller's settings.
    :param attention: ch -> an AttentionBlock of the caller's settings.
    :return: (input_blocks, the width of every activation they produce in order, the
              final width, the final downsampling factor).
    """
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    widths, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                down = res_block(ch, ch, down=True)
            else:
                down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
            blocks.append(TimestepEmbedSequential(down))
            widths.append(ch)
            ds *= 2
    return blocks, widths, ch, ds


class UNetModel(nn.Module):
    """
    The full UNet with attention and timestep embedding.

    :param in_channels: channels in the input tensor.
    :param model_channels: base channel count of the model.
    :param out_channels: channels in the output tensor.
    :param num_res_blocks: number of residual blocks per resolution.
    :param attention_resolutions: a collection of downsample rates at which to use
        attention; e.g. if it contains 4, attention runs at 4x downsampling. Every
        rate must be one the model reaches (1, 2, 4, ... for each level).
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, up/downsample with learned convolutions.
    :param dims: signal dimensionality (1, 2 or 3).
    :param num_classes: if an int, the model is class-conditional with that many
        classes and forward() requires `y`.
    :param use_checkpoint: use gradient checkpointing to reduce memory.
    :param use_fp16: guided-diffusion's flag, stored for the training code. The
        torso runs in the dtype of its weights: call `convert_to_fp16()` to get the
        original's fp16 torso; under `torch.autocast` leave the weights in fp32.
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if not -1, ignore `num_heads` and use this fixed
        channel width per head.
    :param num_heads_upsample: a different number of heads for the upsampling
        path; -1 means `num_heads`. Deprecated in the original.
    :param use_scale_shift_norm: use FiLM-like scale/shift conditioning.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: split q/k/v before heads in attention.
    :param image_size: the image size, informational (guided-diffusion stores it).
    :param class_dropout_prob: classifier-free guidance (Ho and Salimans 2022): in
        training mode, replace each label by a learned null label with this
        probability. When > 0 the label embedding gets one extra row,
        `num_classes`, the null label (`self.null_label`); at 0 the model and its
        checkpoints are those of the originals.
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        *,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        image_size=None,
        class_dropout_prob=0.0,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if class_dropout_prob > 0 and num_classes is None:
            raise ValueError("class_dropout_prob > 0 needs a class-conditional model (class_cond)")
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        _check_attention_config(
            model_channels,
            channel_mult,
            attention_resolutions,
            num_heads,
            num_head_channels,
            num_heads_upsample,
        )

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        self.class_dropout_prob = class_dropout_prob
        # The null label of classifier-free guidance is one row past the classes.
        self.null_label = num_classes if class_dropout_prob > 0 else None
        if num_classes is not None:
            rows = num_classes + (1 if self.null_label is not None else 0)
            self.label_emb = nn.Embedding(rows, time_embed_dim)

        def res_block(ch_in, ch_out, **kwargs):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        # Encoder. `skip_chans` records the width of every activation that the
        # decoder will concatenate back, in order.
        self.input_blocks, skip_chans, ch, ds = _encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            resblock_updown, conv_resample, dims, res_block, lambda c: attention(c, num_heads),
        )

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        # Decoder: one more block per level than the encoder, each taking one skip.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res_block(ch, ch, up=True))
                    else:
                        layers.append(
                            Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                        )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """
        Cast the torso's convolutions to float16, as the original's `use_fp16` did.

        Compatibility shim for sampling with old scripts; for training prefer
        fp32 weights under `torch.autocast`.
        """
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """
        Undo `convert_to_fp16()`.
        """
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)

    @property
    def dtype(self):
        """
        The dtype the torso runs in: that of its weights (float16 after
        `convert_to_fp16()`, else usually float32).
        """
        return self.input_blocks[0][0].weight.dtype

    # improved-diffusion's name for the same thing.
    inner_dtype = dtype

    def _embed(self, x, timesteps, y, drop_labels=None):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional")
        # The sinusoid is computed in float32 (float64 for a float64 model); it only meets
        # lower precision inside time_embed (autocast, or a model cast to half as a whole).
        weight_dtype = self.time_embed[0].weight.dtype
        sinusoid_dtype = torch.promote_types(weight_dtype, torch.float32)
        t_emb = timestep_embedding(timesteps, self.model_channels, dtype=sinusoid_dtype)
        emb = self.time_embed(t_emb.to(weight_dtype))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}"
                )
            if drop_labels is None and self.training and self.class_dropout_prob > 0:
                drop_labels = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
            if drop_labels is not None:
                if self.null_label is None:
                    raise ValueError("drop_labels needs a model built with class_dropout_prob > 0 (a null label)")
                y = torch.where(drop_labels, torch.full_like(y, self.null_label), y)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps, y=None, drop_labels=None):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps (may be fractional).
        :param y: an [N] tensor of labels, if class-conditional.
        :param drop_labels: with `class_dropout_prob` > 0, an [N] bool tensor: the labels to
            replace by the null label (the training loop draws it for the whole batch, so that
            --microbatch changes nothing); None: drawn here, in training mode.
        :return: an [N x C x ...] tensor of outputs.
        """
        emb = self._embed(x, timesteps, y, drop_labels)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))

    def get_feature_vectors(self, x, timesteps, y=None):
        """
        Apply the model and return its intermediate activations (improved-diffusion).

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] tensor of labels, if class-conditional.
        :return: a dict with 'down' (list of encoder activations), 'middle' (the
            lowest-resolution activation) and 'up' (list of decoder activations).
        """
        emb = self._embed(x, timesteps, y)
        result = dict(down=[], up=[])
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
            result["down"].append(h.type(x.dtype))
        h = self.middle_block(h, emb)
        result["middle"] = h.type(x.dtype)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            result["up"].append(h.type(x.dtype))
        return result


class SuperResModel(UNetModel):
    """
    A UNetModel for super-resolution: it takes an extra keyword `low_res`, upsamples
    it bilinearly to the input's size and concatenates it to the input channels.

    :param in_channels: channels of the image (the model sees twice as many).
    Other arguments are those of UNetModel.
    """

    def __init__(self, in_channels, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    def _with_low_res(self, x, low_res):
        if low_res is None:
            raise ValueError("SuperResModel needs the low_res keyword argument")
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        return torch.cat([x, upsampled], dim=1)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        """
        :param x: an [N x C x H x W] tensor of (noisy) high-resolution images.
        :param timesteps: a 1-D batch of timesteps.
        :param low_res: an [N x C x h x w] tensor of low-resolution images.
        :return: an [N x out_channels x H x W] tensor.
        """
        return super().forward(self._with_low_res(x, low_res), timesteps, **kwargs)

    def get_feature_vectors(self, x, timesteps, low_res=None, **kwargs):
        return super().get_feature_vectors(
            self._with_low_res(x, low_res), timesteps, **kwargs
        )


def _check_attention_config(
    model_channels,
    channel_mult,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
):
    """
    Fail at construction, naming the flag, rather than deep in a reshape later.
    """
    reachable = {2**level for level in range(len(channel_mult))}
    unreachable = sorted(set(attention_resolutions) - reachable)
    if unreachable:
        raise ValueError(
            f"attention_resolutions: downsample rate(s) {unreachable} are never "
            f"reached by a UNet with {len(channel_mult)} levels "
            f"(reachable rates: {sorted(reachable)})"
        )
    attn_levels = [
        int(mult * model_channels)
        for level, mult in enumerate(channel_mult)
        if 2**level in attention_resolutions
    ]
    middle = int(channel_mult[-1] * model_channels)
    if num_head_channels != -1:
        for ch in attn_levels + [middle]:
            if num_head_channels < 1 or ch % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} does not divide the "
                    f"{ch} channels of an attention layer"
                )
        return
    for flag, heads, widths in (
        ("num_heads", num_heads, attn_levels + [middle]),
        ("num_heads_upsample", num_heads_upsample, attn_levels),
    ):
        for ch in widths:
            if heads < 1 or ch % heads:
                raise ValueError(
                    f"{flag}={heads} does not divide the {ch} channels of an "
                    f"attention layer"
                )


class ClassifierFreeGuidance(nn.Module):
    """
    Classifier-free guidance (Ho and Salimans 2022) around a model trained with
    `class_dropout_prob > 0`: one forward pass on the batch twice, with the labels
    and with the null label, and

        eps = (1 + w) * eps(x, y) - w * eps(x, null).

    Only the first C output channels (the noise, or x_0: the combination is affine
    with weights summing to one, so guiding x_0 is the same as guiding eps) are
    combined; learned variance channels are the conditional pass's.

    :param model: a class-conditional UNetModel with a null label.
    :param guidance_scale: w; 0 gives the conditional model.
    """

    def __init__(self, model, guidance_scale):
        super().__init__()
        if getattr(model, "null_label", None) is None:
            raise ValueError(
                "classifier-free guidance needs a class-conditional model trained with "
                "--class_dropout_prob > 0 (its label embedding has no null-label row)"
            )
        self.model = model
        self.guidance_scale = float(guidance_scale)

    def forward(self, x, timesteps, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs the class labels y")
        null = torch.full_like(y, self.model.null_label)
        extra = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        out = self.model(
            torch.cat([x, x]), torch.cat([timesteps, timesteps]), y=torch.cat([y, null]), **extra
        )
        cond, uncond = out.split(x.shape[0])
        w, c = self.guidance_scale, x.shape[1]
        guided = (1 + w) * cond[:, :c] - w * uncond[:, :c]
        return torch.cat([guided, cond[:, c:]], dim=1)


class AttentionPool2d(nn.Module):
    """
    CLIP-style attention pooling (guided-diffusion's classifier head): the mean of
    the feature map is prepended as an extra token, a learned positional embedding
    is added, and the mean token's attention output over all tokens, projected by
    `c_proj`, is the result.

    :param spacial_dim: side of the square feature map (the original's spelling).
    :param embed_dim: channels of the feature map.
    :param num_heads_channels: channels per attention head.
    :param output_dim: channels of the result; default `embed_dim`.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        if num_heads_channels < 1 or embed_dim % num_heads_channels:
            raise ValueError(
                f"attention pooling: {embed_dim} channels are not divisible by "
                f"num_head_channels={num_heads_channels}"
            )
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        # q, k and v are split before the heads (guided-diffusion's QKVAttention).
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        """
        :param x: an [N x C x H x W] feature map with H * W = spacial_dim ** 2.
        :return: an [N x output_dim] tensor.
        """
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        if x.shape[2] + 1 != self.positional_embedding.shape[1]:
            raise ValueError(
                f"attention pooling was built for {self.spacial_dim}x{self.spacial_dim} "
                f"feature maps, got {'x'.join(map(str, spatial))} (is the image size right?)"
            )
        x = torch.cat([x.mean(dim=2, keepdim=True), x], dim=2)
        tokens = (x + self.positional_embedding.to(x.dtype)).transpose(1, 2)
        qkv = pointwise_conv_as_linear(self.qkv_proj, tokens)
        h = self.attention.attend_tokens(qkv)
        return pointwise_conv_as_linear(self.c_proj, h[:, 0])


ENCODER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(nn.Module):
    """
    The encoder half of the UNet, with a pooling head: guided-diffusion's noise-aware
    classifier. Parameter names are the original's (`time_embed`, `input_blocks`,
    `middle_block`, `out`), so its released classifiers load with `strict=True`.

    :param pool: the head: "adaptive" (global average, then a 1x1 convolution),
        "attention" (AttentionPool2d; needs `num_head_channels`), "spatial" (the
        means of every encoder activation, concatenated, through a two-layer MLP
        with ReLU) or "spatial_v2" (the same MLP with GroupNorm and SiLU).
    Other arguments are those of UNetModel (`num_heads_upsample` is accepted and
    unused, as in the original); `out_channels` is the number of logits.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        if pool not in ENCODER_POOLS:
            raise ValueError(f"pool must be one of {', '.join(ENCODER_POOLS)}, got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (channels per head)")
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        _check_attention_config(
            model_channels, channel_mult, attention_resolutions, num_heads, num_head_channels, num_heads
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in, ch_out, **kwargs):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        def attention(ch):
            return AttentionBlock(
                ch,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        # The encoder of UNetModel; `widths` lists the channels of every activation
        # that the spatial heads average.
        self.input_blocks, widths, ch, ds = _encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            resblock_updown, conv_resample, dims, res_block, attention,
        )

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch), res_block(ch, ch)
        )
        widths.append(ch)
        self._feature_size = sum(widths)

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if image_size is None or image_size % ds:
                raise ValueError(
                    f"pool='attention' needs an image_size divisible by {ds}, got {image_size}"
                )
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )

    def convert_to_fp16(self):
        """Cast the torso's convolutions to float16, as the original's `use_fp16` did."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo `convert_to_fp16()`."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)

    @property
    def dtype(self):
        """The dtype the torso runs in: that of its weights."""
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x, timesteps):
        """
        Apply the classifier to a batch of (noisy) images.

        :param x: an [N x C x H x W] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x out_channels] tensor of logits.
        """
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
