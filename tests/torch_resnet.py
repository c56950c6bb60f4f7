"""A PyTorch ResNet with torchvision's module names and topology, for reference tests.

Written here (torchvision is not installed): ``make_resnet("resnet18", 10, "imagenet", seed=0)``
has exactly the state-dict keys and shapes of ``torchvision.models.resnet18(num_classes=10)``
(``conv1.weight``, ``bn1.*``, ``layerX.Y.convZ.weight``, ``layerX.Y.downsample.0.weight``,
``layerX.Y.downsample.1.*``, ``fc.*``), ResNet v1.5 blocks (a Bottleneck's stride on its 3x3
conv). Stems, matching :mod:`wmdd_jax.models.resnet`:

  * ``imagenet``: 7x7/2 conv (padding 3) + BN + ReLU + 3x3/2 max-pool (padding 1);
  * ``tiny`` / ``cifar``: 3x3/1 conv (padding 1), no max-pool (``maxpool = Identity``);
  * ``tiny_official``: 3x3/2 conv (padding 3), no max-pool (the official WMDD Tiny-ImageNet
    teacher).

Use::

  net = make_resnet("resnet18", 10, "cifar", seed=0)   # eval mode, float32, random BN stats
  logits = net(x_nchw)                                  # f32[B, 10]
  net.features                                          # f32[B, 512], set by every forward
  state = {k: v.numpy() for k, v in net.state_dict().items()}

Needs torch; import it only from tests that ``pytest.importorskip("torch")`` first.
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
STEMS = ("imagenet", "tiny", "cifar", "tiny_official")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: conv3x3(stride) - BN - ReLU - conv3x3 - BN, + shortcut, ReLU."""

  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int = 1,
               downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = _conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 - 3x3(stride) - 1x1 (x4), + shortcut, ReLU."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1,
               downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = _conv1x1(cin, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's ResNet with a choice of stem; ``forward`` also stores ``self.features``.

  Args:
    block: "basic" or "bottleneck".
    layers: blocks per stage, e.g. (2, 2, 2, 2).
    num_classes: classifier width.
    stem: one of :data:`STEMS`.
    in_channels: input channels (3 for RGB).
  """

  def __init__(self, block: str, layers: tuple[int, ...], num_classes: int,
               stem: str = "imagenet", in_channels: int = 3):
    super().__init__()
    if stem not in STEMS:
      raise ValueError(f"Unknown stem {stem!r}; use one of {STEMS}.")
    block_cls = BasicBlock if block == "basic" else Bottleneck
    self.inplanes = 64
    kernel, stride, pad = {"imagenet": (7, 2, 3), "tiny_official": (3, 2, 3)}.get(stem, (3, 1, 1))
    self.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=pad, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet"
                    else nn.Identity())
    self.layer1 = self._make_layer(block_cls, 64, layers[0])
    self.layer2 = self._make_layer(block_cls, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block_cls, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block_cls, 512, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block_cls.expansion, num_classes)
    self.features: torch.Tensor | None = None

  def _make_layer(self, block_cls: type[nn.Module], planes: int, blocks: int,
                  stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block_cls.expansion:
      downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block_cls.expansion, stride),
                                 nn.BatchNorm2d(planes * block_cls.expansion))
    layers = [block_cls(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block_cls.expansion
    layers += [block_cls(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x f32[B, ch, H, W] -> logits f32[B, num_classes]; sets ``self.features`` f32[B, d]."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    self.features = torch.flatten(self.avgpool(x), 1)
    return self.fc(self.features)


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
  """Gives every BatchNorm non-trivial affine parameters and running statistics (in place).

  weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2),
  from a generator seeded with ``seed``; num_batches_tracked is set to 1.

  Returns:
    ``model``.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.modules.batchnorm._BatchNorm):
        n = module.num_features
        module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        module.num_batches_tracked.fill_(1)
  return model


def make_resnet(arch: str, num_classes: int, stem: str = "imagenet", seed: int = 0, *,
                in_channels: int = 3) -> ResNet:
  """A seeded torchvision-style ResNet in eval mode, float32, with random BN statistics.

  Args:
    arch: "resnet18", "resnet34", "resnet50" or "resnet101".
    num_classes: classifier width.
    stem: one of :data:`STEMS`.
    seed: seeds the weights (PyTorch's default initialisers) and the BN statistics.
    in_channels: input channels.

  Returns:
    The model, ``eval()``-ed, its parameters not requiring gradients.
  """
  if arch not in LAYOUTS:
    raise ValueError(f"Unknown arch {arch!r}; use one of {tuple(LAYOUTS)}.")
  torch.manual_seed(seed)
  block, layers = LAYOUTS[arch]
  model = ResNet(block, layers, num_classes, stem, in_channels).float()
  randomize_bn(model, seed + 1)
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  return model


def state_dict_numpy(model: nn.Module) -> dict:
  """``model.state_dict()`` as numpy arrays (what a ``.pth`` holds, in torchvision's names)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def bn_input_moments(model: nn.Module, x: torch.Tensor
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
  """One forward pass recording every BN layer's input moments, in call order.

  Args:
    model: a model from :func:`make_resnet`.
    x: f32[B, ch, H, W].

  Returns:
    (logits f32[B, C], means, variances): per BN call, f32[B, ch_l] per-sample mean and biased
    variance of the layer's input over its spatial positions.
  """
  means, variances, handles = [], [], []

  def hook(module, inputs, output):
    del module, output
    h = inputs[0].double()
    means.append(h.mean(dim=(2, 3)).float())
    variances.append(h.var(dim=(2, 3), unbiased=False).float())

  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      handles.append(module.register_forward_hook(hook))
  try:
    with torch.no_grad():
      logits = model(x)
  finally:
    for handle in handles:
      handle.remove()
  return logits, means, variances
