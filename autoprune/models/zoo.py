"""Built-in architectures: small, CPU-friendly models that Torch-Pruning can prune structurally.

Input conventions (the data module follows them):

- image models (``resnet*``, ``mobilenetv2``, ``vgg``) take float ``(B, C, H, W)``;
- sequence models (``cnn1d``, ``transformer``, ``lstm``, ``gru``) take float ``(B, C, L)``, channel-first like
  ``nn.Conv1d`` (the transformer and the recurrent models transpose inside); a ``transformer`` built with
  ``vocab_size`` takes int64 token ids ``(B, L)`` instead;
- ``mlp`` flattens whatever it gets.

Every model is a :class:`ZooModel`: it exposes ``example_input_shape`` (the input shape without the batch
dimension), ``example_input_dtype`` and ``classifier``, the final ``nn.Linear`` that pruning code keeps
intact.
Builders take keyword arguments only, validate them and raise :class:`~autoprune.errors.InvalidModelError`
naming the architecture and the bad argument. Initialisation only draws from torch's global generator, so a
build is deterministic under ``torch.manual_seed``.

Widths are rounded to multiples of 8 (hardware-friendly). ResNets use option-B shortcuts (1x1 conv + BN) on
downsampling: option-A zero-padding shortcuts cannot be pruned structurally. Every image model ends with an
adaptive average pool, so it runs on any input size down to 8x8 (``digits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import InvalidModelError
from autoprune.names import MAX_CLASSES

__all__ = [
    "MLP",
    "VGG",
    "BasicBlock",
    "CNN1d",
    "InvertedResidual",
    "MobileNetV2",
    "RNNClassifier",
    "ResNet",
    "TransformerClassifier",
    "ZooModel",
    "cnn1d",
    "gru",
    "lstm",
    "mlp",
    "mobilenetv2",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "transformer",
    "vgg",
]

DEFAULT_MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    # (expand ratio t, output channels c, repeats n, first stride s); CIFAR-style: only two stride-2 stages
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)
DEFAULT_VGG_CFG: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)
"""VGG-11's eight convolutions at reduced width; ``"M"`` is a 2x2 max-pool."""


# --------------------------------------------------------------------------------------------------- helpers


def _int(arch: str, name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidModelError(f"{arch}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _classes(arch: str, value: object) -> int:
    """``num_classes``: at most :data:`~autoprune.names.MAX_CLASSES`, the bound a dataset's labels have too (a
    caller's ``{"num_classes": 10**9}`` would otherwise make the builder allocate a classifier of that width)."""
    n = _int(arch, "num_classes", value)
    if n > MAX_CLASSES:
        raise InvalidModelError(f"{arch}: num_classes must be at most {MAX_CLASSES}, got {n}")
    return n


def _float(arch: str, name: str, value: object, *, low: float, high: float, high_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise InvalidModelError(f"{arch}: {name} must be a number in [{low}, {high}{bracket}, got {value!r}")
    assert isinstance(value, int | float)
    return float(value)


def _ints(arch: str, name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidModelError(f"{arch}: {name} must be a list of positive integers, got {value!r}")
    if not value and not allow_empty:
        raise InvalidModelError(f"{arch}: {name} must not be empty")
    return tuple(_int(arch, f"{name}[{i}]", v) for i, v in enumerate(value))


def _divisible(value: float, divisor: int = 8) -> int:
    """Round a width to the nearest multiple of ``divisor`` (at least ``divisor``), never losing >10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _init_weights(module: nn.Module) -> None:
    """Kaiming init for convolutions, unit BN/LN, small normal for linears; uses the global generator."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ZooModel(nn.Module):
    """Base class of the built-in models: the attributes callers rely on."""

    example_input_shape: tuple[int, ...]
    """Input shape without the batch dimension."""
    example_input_dtype: torch.dtype
    """``torch.float32``, or ``torch.int64`` for token models."""
    classifier: nn.Linear
    """The final layer (logits); pruning keeps it intact."""


# --------------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-B (1x1 conv + BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(ZooModel):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of ``n`` BasicBlocks, depth ``6n + 2``."""

    def __init__(
        self, *, blocks_per_stage: int, in_channels: int, num_classes: int, image_size: int, width: float
    ) -> None:
        super().__init__()
        widths = [_divisible(c * width) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_planes, num_classes)
        self.example_input_shape = (in_channels, image_size, image_size)
        self.example_input_dtype = torch.float32
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.flatten(self.pool(x)))


def resnet(
    *, depth: int = 20, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0
) -> ResNet:
    """CIFAR-style ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56...), stage widths 16/32/64 x width."""
    arch = f"resnet{depth}" if isinstance(depth, int) else "resnet"
    _int(arch, "depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise InvalidModelError(f"{arch}: depth must be 6n + 2 (20, 32, 44, 56, 110...), got {depth!r}")
    return ResNet(
        blocks_per_stage=(depth - 2) // 6,
        in_channels=_int(arch, "in_channels", in_channels),
        num_classes=_classes(arch, num_classes),
        image_size=_int(arch, "image_size", image_size),
        width=_float(arch, "width", width, low=0.01, high=16.0),
    )


def resnet20(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20 (3 BasicBlocks per stage, ~0.27M parameters at width 1)."""
    return resnet(depth=20, in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


def resnet32(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-32 (5 BasicBlocks per stage)."""
    return resnet(depth=32, in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


def resnet44(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-44 (7 BasicBlocks per stage)."""
    return resnet(depth=44, in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


def resnet56(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-56 (9 BasicBlocks per stage, ~0.85M parameters at width 1)."""
    return resnet(depth=56, in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


# ----------------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) → 3x3 depthwise (ReLU6) → 1x1 linear projection, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = _divisible(inp * expand_ratio) if expand_ratio != 1 else inp
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(ZooModel):
    """MobileNetV2 (Sandler et al. 2018) with a CIFAR-style stride-1 stem and a short default block list."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: float,
        settings: Sequence[tuple[int, int, int, int]],
        stem_channels: int,
        last_channels: int,
    ) -> None:
        super().__init__()
        inp = _divisible(stem_channels * width)
        last = _divisible(last_channels * max(1.0, width))
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, inp, 3, padding=1, bias=False), nn.BatchNorm2d(inp), nn.ReLU6())
        ]
        for t, c, n, s in settings:
            oup = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        layers.append(nn.Sequential(nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)
        self.example_input_shape = (in_channels, image_size, image_size)
        self.example_input_dtype = torch.float32
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def mobilenetv2(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    settings: Sequence[Sequence[int]] | None = None,
    stem_channels: int = 32,
    last_channels: int = 256,
) -> MobileNetV2:
    """Small MobileNetV2; ``settings`` is a list of ``(t, c, n, s)`` rows as in the paper's Table 2."""
    arch = "mobilenetv2"
    rows = DEFAULT_MOBILENETV2_SETTINGS if settings is None else settings
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence) or not rows:
        raise InvalidModelError(f"{arch}: settings must be a non-empty list of (t, c, n, s) rows")
    parsed: list[tuple[int, int, int, int]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence) or len(row) != 4:
            raise InvalidModelError(f"{arch}: settings[{i}] must be a (t, c, n, s) row, got {row!r}")
        t, c, n, s = (_int(arch, f"settings[{i}]", v) for v in row)
        if s > 2:
            raise InvalidModelError(f"{arch}: settings[{i}] stride must be 1 or 2, got {s}")
        parsed.append((t, c, n, s))
    return MobileNetV2(
        in_channels=_int(arch, "in_channels", in_channels),
        num_classes=_classes(arch, num_classes),
        image_size=_int(arch, "image_size", image_size),
        width=_float(arch, "width", width, low=0.01, high=16.0),
        settings=parsed,
        stem_channels=_int(arch, "stem_channels", stem_channels),
        last_channels=_int(arch, "last_channels", last_channels),
    )


# ------------------------------------------------------------------------------------------------------ VGG


class VGG(ZooModel):
    """Conv-BN-ReLU stacks with 2x2 max-pools, global average pool and a linear classifier."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, cfg: Sequence[int | str]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                # A pool that would shrink the map below 1x1 at `image_size` is left out, so one cfg serves
                # 32x32 (CIFAR) and 8x8 (digits) inputs alike.
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                assert isinstance(item, int)
                layers += [
                    nn.Conv2d(channels, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        self.example_input_shape = (in_channels, image_size, image_size)
        self.example_input_dtype = torch.float32
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def vgg(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    cfg: Sequence[int | str] | None = None,
) -> VGG:
    """VGG-style network; ``cfg`` lists conv widths and ``"M"`` for max-pools (default: VGG-11, narrower).

    Conv widths are multiplied by ``width`` and rounded to multiples of 8.
    """
    arch = "vgg"
    items = DEFAULT_VGG_CFG if cfg is None else cfg
    if isinstance(items, str | bytes) or not isinstance(items, Sequence) or not items:
        raise InvalidModelError(f"{arch}: cfg must be a non-empty list of channel counts and 'M'")
    w = _float(arch, "width", width, low=0.01, high=16.0)
    parsed: list[int | str] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.upper() == "M":
            parsed.append("M")
        else:
            parsed.append(_divisible(_int(arch, f"cfg[{i}]", item) * w))
    if not any(isinstance(item, int) for item in parsed):
        raise InvalidModelError(f"{arch}: cfg must contain at least one convolution width")
    return VGG(
        in_channels=_int(arch, "in_channels", in_channels),
        num_classes=_classes(arch, num_classes),
        image_size=_int(arch, "image_size", image_size),
        cfg=parsed,
    )


# ------------------------------------------------------------------------------------------------------ MLP


class MLP(ZooModel):
    """Flatten → (Linear → ReLU) x len(hidden) → Linear classifier."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        features = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(features, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)
        self.example_input_shape = input_shape
        self.example_input_dtype = torch.float32
        for m in self.body.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(self.flatten(x)))


def mlp(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    in_features: int | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.0,
) -> MLP:
    """Multi-layer perceptron over the flattened input.

    The first Linear sees ``in_channels * S`` features, where ``S`` is ``in_features`` (default 64;
    example input ``(in_channels, in_features)``), or ``image_size ** 2`` (example input ``(C, H, W)``), or
    ``seq_len`` (example input ``(C, L)``): give at most one of the three, so the MLP can be built with the
    same size keyword as the image or the sequence models.
    """
    arch = "mlp"
    sizes = (("in_features", in_features), ("image_size", image_size), ("seq_len", seq_len))
    given = [k for k, v in sizes if v is not None]
    if len(given) > 1:
        raise InvalidModelError(f"{arch}: give only one of in_features, image_size, seq_len (got {given})")
    c = _int(arch, "in_channels", in_channels)
    shape: tuple[int, ...]
    if image_size is not None:
        s = _int(arch, "image_size", image_size)
        shape = (c, s, s)
    elif seq_len is not None:
        shape = (c, _int(arch, "seq_len", seq_len))
    else:
        shape = (c, _int(arch, "in_features", 64 if in_features is None else in_features))
    return MLP(
        input_shape=shape,
        num_classes=_classes(arch, num_classes),
        hidden=_ints(arch, "hidden", hidden, allow_empty=True),
        dropout=_float(arch, "dropout", dropout, low=0.0, high=1.0, high_open=True),
    )


# ---------------------------------------------------------------------------------------------------- CNN1d


class CNN1d(ZooModel):
    """Conv1d-BN-ReLU blocks (stride 2 after the first) → global average pool → Linear classifier."""

    def __init__(
        self, *, in_channels: int, num_classes: int, seq_len: int, channels: Sequence[int], kernel_size: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, out in enumerate(channels):
            layers += [
                nn.Conv1d(c, out, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(out),
                nn.ReLU(),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        self.example_input_shape = (in_channels, seq_len)
        self.example_input_dtype = torch.float32
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def cnn1d(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    seq_len: int = 40,
    channels: Sequence[int] = (32, 64, 128),
    kernel_size: int = 5,
) -> CNN1d:
    """1-D CNN for ``(B, C, L)`` sequences; every block after the first halves the length."""
    arch = "cnn1d"
    k = _int(arch, "kernel_size", kernel_size)
    if k % 2 == 0:
        raise InvalidModelError(f"{arch}: kernel_size must be odd, got {k}")
    return CNN1d(
        in_channels=_int(arch, "in_channels", in_channels),
        num_classes=_classes(arch, num_classes),
        seq_len=_int(arch, "seq_len", seq_len),
        channels=_ints(arch, "channels", channels),
        kernel_size=k,
    )


# ---------------------------------------------------------------------------------------------- Transformer


class TransformerClassifier(ZooModel):
    """Input projection (or token embedding) + learned positions → TransformerEncoder → mean → LN → Linear."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        seq_len: int,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        norm_first: bool,
        vocab_size: int | None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = seq_len
        self.nhead = nhead
        self.input_proj: nn.Linear | None = None
        self.token_embed: nn.Embedding | None = None
        if vocab_size is None:
            self.input_proj = nn.Linear(in_channels, d_model)
            self.example_input_shape = (in_channels, seq_len)
            self.example_input_dtype = torch.float32
        else:
            self.token_embed = nn.Embedding(vocab_size, d_model)
            self.example_input_shape = (seq_len,)
            self.example_input_dtype = torch.int64
        self.pos_embed = nn.Embedding(seq_len, d_model)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            batch_first=True,
            norm_first=norm_first,
        )
        # enable_nested_tensor only helps padded batches and warns with norm_first=True.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, num_classes)
        for m in (self.pos_embed, self.token_embed):
            if m is not None:
                nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def attention_modules(self) -> list[nn.MultiheadAttention]:
        """The encoder's attention modules (pruning code passes ``{mha: nhead}`` to Torch-Pruning)."""
        return [m for m in self.modules() if isinstance(m, nn.MultiheadAttention)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_embed is not None:
            h = self.token_embed(x)  # (B, L) ids → (B, L, D)
        else:
            assert self.input_proj is not None
            h = self.input_proj(x.transpose(1, 2))  # (B, C, L) → (B, L, C) → (B, L, D)
        length = h.shape[1]
        if length > self.max_len:
            raise InvalidModelError(f"transformer: sequence length {length} exceeds seq_len={self.max_len}")
        positions = self.positions
        assert isinstance(positions, torch.Tensor)
        h = h + self.pos_embed(positions[:length])
        h = self.encoder(h)
        return self.classifier(self.norm(h.mean(dim=1)))


def transformer(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    seq_len: int = 40,
    d_model: int = 64,
    nhead: int = 4,
    num_layers: int = 2,
    dim_feedforward: int = 128,
    dropout: float = 0.0,
    norm_first: bool = True,
    vocab_size: int | None = None,
) -> TransformerClassifier:
    """Small encoder-only classifier for ``(B, C, L)`` inputs, or ``(B, L)`` token ids when ``vocab_size``."""
    arch = "transformer"
    d = _int(arch, "d_model", d_model)
    h = _int(arch, "nhead", nhead)
    if d % h:
        raise InvalidModelError(f"{arch}: d_model={d} must be divisible by nhead={h}")
    if not isinstance(norm_first, bool):
        raise InvalidModelError(f"{arch}: norm_first must be true or false, got {norm_first!r}")
    return TransformerClassifier(
        in_channels=_int(arch, "in_channels", in_channels),
        num_classes=_classes(arch, num_classes),
        seq_len=_int(arch, "seq_len", seq_len),
        d_model=d,
        nhead=h,
        num_layers=_int(arch, "num_layers", num_layers),
        dim_feedforward=_int(arch, "dim_feedforward", dim_feedforward),
        dropout=_float(arch, "dropout", dropout, low=0.0, high=1.0, high_open=True),
        norm_first=norm_first,
        vocab_size=None if vocab_size is None else _int(arch, "vocab_size", vocab_size),
    )


# ------------------------------------------------------------------------------------------------ LSTM, GRU


class RNNClassifier(ZooModel):
    """``(B, C, L)`` → ``(B, L, C)`` → LSTM/GRU (batch_first) → last time step → Linear classifier."""

    def __init__(
        self,
        *,
        cell: str,
        in_channels: int,
        num_classes: int,
        seq_len: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn: nn.LSTM | nn.GRU = rnn_cls(
            in_channels,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.example_input_shape = (in_channels, seq_len)
        self.example_input_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(1, 2))
        return self.classifier(out[:, -1])


def _rnn(
    cell: str,
    in_channels: int,
    num_classes: int,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    dropout: float,
) -> RNNClassifier:
    return RNNClassifier(
        cell=cell,
        in_channels=_int(cell, "in_channels", in_channels),
        num_classes=_classes(cell, num_classes),
        seq_len=_int(cell, "seq_len", seq_len),
        hidden_size=_int(cell, "hidden_size", hidden_size),
        num_layers=_int(cell, "num_layers", num_layers),
        dropout=_float(cell, "dropout", dropout, low=0.0, high=1.0, high_open=True),
    )


def lstm(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    seq_len: int = 40,
    hidden_size: int = 64,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> RNNClassifier:
    """LSTM classifier over ``(B, C, L)`` sequences (dropout applies between layers only)."""
    return _rnn("lstm", in_channels, num_classes, seq_len, hidden_size, num_layers, dropout)


def gru(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    seq_len: int = 40,
    hidden_size: int = 64,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> RNNClassifier:
    """GRU classifier over ``(B, C, L)`` sequences (dropout applies between layers only)."""
    return _rnn("gru", in_channels, num_classes, seq_len, hidden_size, num_layers, dropout)
