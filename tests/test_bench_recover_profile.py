"""bench/recover_profile.py: its BN-free convolution network is the teacher's convolutions (the
timing itself is the benchmark's job, not a test's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import recover_profile
from wmdd_jax.models import get_model, init_model


def test_conv_layers_are_resnet18s_twenty_convolutions_with_their_input_shapes():
  model = get_model("resnet18", 3, stem="cifar")
  params = init_model(model, jax.random.key(0), (16, 16, 3))["params"]
  x = jnp.ones((2, 16, 16, 3), jnp.float32)
  layers = recover_profile._conv_layers(params, x)
  assert len(layers) == 20
  assert [n for n, _, _, s in layers if s == 2] == [
      "layer2_0/conv1", "layer2_0/downsample_conv", "layer3_0/conv1",
      "layer3_0/downsample_conv", "layer4_0/conv1", "layer4_0/downsample_conv"]
  for name, inp, kernel, _ in layers:
    assert inp.shape[-1] == kernel.shape[2], name  # every input carries the kernel's channels
  assert recover_profile._conv_relu_net(x, params).shape == (2, 512)


@pytest.mark.torch
@pytest.mark.parametrize("size,stride", [(3, 1), (3, 2), (1, 2)])
def test_torch_convolution_is_the_same_convolution_as_xlas(size, stride):
  """The per-layer comparison times PyTorch and XLA on the same convolution: same outputs."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  inp = jnp.asarray(rng.normal(size=(2, 8, 8, 4)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(size, size, 4, 5)).astype(np.float32))
  conv, x = recover_profile._torch_conv(inp, kernel, stride)
  with torch.no_grad():
    ours = conv(x).numpy().transpose(0, 2, 3, 1)  # back to NHWC
  np.testing.assert_allclose(ours, np.asarray(recover_profile._conv(inp, kernel, stride)),
                             rtol=1e-4, atol=1e-4)
  ms = recover_profile._torch_conv_ms(inp, kernel, stride, 1, 1)
  assert ms is not None and all(t > 0 for t in ms)
