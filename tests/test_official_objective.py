"""The recover objectives against a PyTorch transcription of the official WMDD code.

The reference below is written from recover/data_synthesis_new.py (``get_images``: CE * r_wb +
``torch.norm(feature - wass_bary, 2)`` + r_bn * sum of hooked BN terms with the first-BN
multiplier), recover/utils.py (``BNFeatureHook_new`` per-class branch, ``BNFeatureHook`` running
statistics branch, ``EmbedderHook``) and recover/data_synthesis.py (the SRe2L-style loop: one
image of every class per batch, running statistics), on a ResNet-18 with 20 BN layers
(tests/torch_resnet.py, converted to our Flax model with wmdd_jax.convert). The augmentation is
replayed in torch from our draw (crop box, flip, roll), as torchvision applies it to tensors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import convert
from wmdd_jax.data import transforms
from wmdd_jax.models import get_model
from wmdd_jax.models.base import running_statistics
from wmdd_jax.recover import RecoverOptions, RecoverTargets, chunk_loss

# PyTorch is imported when a test here runs, not when pytest collects the module: `make test`
# runs the torch-marked tests in their own process, so the package's tests never share a
# process with torch (see tests/conftest.py).
pytestmark = pytest.mark.torch
torch = F = torch_resnet = None


@pytest.fixture(scope="module", autouse=True)
def _torch():
  global torch, F, torch_resnet
  torch = pytest.importorskip("torch")
  import torch.nn.functional as functional

  from tests import torch_resnet as reference

  F, torch_resnet = functional, reference

NUM_CLASSES = 6
HW = 16
K = 2
CHUNK = np.array([1, 2, 3, 4])  # a chunk of 4 classes (start_cls=1, end_cls=5)


@pytest.fixture(scope="module")
def nets():
  net = torch_resnet.make_resnet("resnet18", NUM_CLASSES, "cifar", seed=3)
  variables = convert.torchvision_to_flax(torch_resnet.state_dict_numpy(net), arch="resnet18",
                                          stem="cifar")
  variables = jax.tree.map(jnp.asarray, variables)
  model = get_model("resnet18", NUM_CLASSES, stem="cifar")
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(bns) == 20
  return net, model, variables, bns


@pytest.fixture(scope="module")
def data(nets):
  _, _, _, bns = nets
  rng = np.random.default_rng(0)
  targets = RecoverTargets(
      features=np.abs(rng.normal(size=(NUM_CLASSES, K, 512))).astype(np.float32),
      bn_mean=tuple(rng.normal(0, 0.3, (NUM_CLASSES, b.num_features)).astype(np.float32)
                    for b in bns),
      bn_var=tuple(rng.uniform(0.3, 2.0, (NUM_CLASSES, b.num_features)).astype(np.float32)
                   for b in bns),
      global_mean=(), global_var=())
  images = rng.normal(size=(len(CHUNK), K, HW, HW, 3)).astype(np.float32)
  return targets, images


def _torch_augment(x, key, options):
  """Our augmentation draw for ``key`` (transforms._augment's splits), applied in torch."""
  if not options.augment:
    return x
  k_crop, k_flip, k_shift = jax.random.split(key, 3)
  y0, x0, h, w = (int(v) for v in transforms.sample_crop_box(k_crop, (HW, HW),
                                                             tuple(options.crop_scale)))
  # torchvision's resized_crop on a tensor: slice, then bilinear (antialias) interpolation.
  x = F.interpolate(x[:, :, y0:y0 + h, x0:x0 + w], size=(HW, HW), mode="bilinear",
                    align_corners=False, antialias=True)
  if bool(jax.random.bernoulli(k_flip, 0.5)):
    x = torch.flip(x, dims=[3])
  lim = int(HW * options.jitter_fraction)
  off = np.asarray(jax.random.randint(k_shift, (2,), 0, lim + 1))
  return torch.roll(x, shifts=(int(off[0]), int(off[1])), dims=(2, 3))


def official_loss(net, images, targets, class_ids, key, options, *, per_class_bn, wb, r_wb,
                  r_bn, first_bn_multiplier, bary=None, bn_targets=None):
  """A transcription of the official step's loss; returns (loss, d loss / d images NHWC).

  ``per_class_bn``: data_synthesis_new.py's BNFeatureHook_new (class-chunked batch of
  ``ipc`` images per class); otherwise recover/utils.py BNFeatureHook's running-statistics
  branch. ``wb``: the barycenter term (with CE * r_wb in data_synthesis_new.py; alone in
  data_synthesis.py) instead of CE alone.
  """
  n_cls, ipc = images.shape[:2]
  inputs = torch.tensor(images.reshape(n_cls * ipc, HW, HW, 3).transpose(0, 3, 1, 2),
                        requires_grad=True)
  targets_t = torch.tensor(np.repeat(class_ids, ipc), dtype=torch.long)
  hooks, terms = [], []

  def bn_hook(module, inputs_, output):
    del output
    x = inputs_[0]
    if per_class_bn:
      _, nch, h, w = x.shape
      inp = x.view(n_cls, ipc, nch, h, w)
      mean = inp.mean([1, 3, 4])
      var = inp.var([1, 3, 4], unbiased=False)
      tmean, tvar = module.target_mean[class_ids], module.target_var[class_ids]
      diff_var, diff_mean = tvar - var, tmean - mean
      terms.append(torch.norm(diff_var, dim=1).mean() + torch.norm(diff_mean, dim=1).mean())
    else:
      nch = x.shape[1]
      mean = x.mean([0, 2, 3])
      var = x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
      terms.append(torch.norm(module.running_var.data - var, 2)
                   + torch.norm(module.running_mean.data - mean, 2))

  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for layer, module in enumerate(bns):
    if bn_targets is not None:
      module.target_mean = torch.tensor(bn_targets[0][layer])
      module.target_var = torch.tensor(bn_targets[1][layer])
    hooks.append(module.register_forward_hook(bn_hook))
  try:
    outputs = net(_torch_augment(inputs, key, options))
    feature = net.features.view(net.features.shape[0], -1)  # EmbedderHook on avgpool
    criterion = torch.nn.CrossEntropyLoss()
    if not wb:
      loss_main = criterion(outputs, targets_t)
    else:
      wass_bary = torch.tensor(bary[class_ids]).view(-1, bary.shape[-1])
      loss_main = torch.norm(feature - wass_bary, 2)
      if r_wb:
        loss_main = criterion(outputs, targets_t) * r_wb + loss_main
    rescale = [first_bn_multiplier] + [1.0] * (len(terms) - 1)
    loss = loss_main + r_bn * sum(t * s for t, s in zip(terms, rescale))
    loss.backward()
  finally:
    for h in hooks:
      h.remove()
  grad = inputs.grad.numpy().transpose(0, 2, 3, 1).reshape(images.shape)
  return float(loss.detach()), grad


def ours(model, variables, images, targets, class_ids, key, options):
  f = lambda x: chunk_loss(x, variables, targets.take(class_ids), jnp.asarray(class_ids), key,
                           model=model, options=options)[0]
  loss, grad = jax.value_and_grad(f)(jnp.asarray(images))
  return float(loss), np.asarray(grad)


def assert_per_image_close(grad, ref, rtol):
  g, r = grad.reshape(-1, HW * HW * 3), ref.reshape(-1, HW * HW * 3)
  err = np.linalg.norm(g - r, axis=1) / np.linalg.norm(r, axis=1)
  assert err.max() < rtol, err


@pytest.mark.parametrize("augment", [False, True])
def test_official_objective_equals_transcription(nets, data, augment):
  net, model, variables, _ = nets
  targets, images = data
  options = RecoverOptions(objective="official", r_bn=0.7, r_ce=1.0, first_bn_multiplier=1.0,
                           augment=augment)
  key = jax.random.key(11)
  loss, grad = ours(model, variables, images, targets, CHUNK, key, options)
  ref_loss, ref_grad = official_loss(
      net, images, targets, CHUNK, key, options, per_class_bn=True, wb=True, r_wb=1.0,
      r_bn=0.7, first_bn_multiplier=1.0, bary=targets.features,
      bn_targets=(targets.bn_mean, targets.bn_var))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_per_image_close(grad, ref_grad, 1e-5)
  # The per-class form is a different objective on a chunk of 4 classes.
  per_class = ours(model, variables, images, targets, CHUNK, key,
                   RecoverOptions(objective="per_class", r_bn=0.7, r_ce=1.0, augment=augment))
  assert abs(per_class[0] - ref_loss) > 0.1 * ref_loss


def test_ce_pcbn_equals_transcription(nets, data):
  # data_synthesis_new.py --wb false: CE (weight 1) + r_bn * per-class BN.
  net, model, variables, _ = nets
  targets, images = data
  options = RecoverOptions(objective="official", feature_target="none", r_ce=1.0, r_bn=0.3)
  key = jax.random.key(4)
  loss, grad = ours(model, variables, images, targets, CHUNK, key, options)
  ref_loss, ref_grad = official_loss(
      net, images, targets, CHUNK, key, options, per_class_bn=True, wb=False, r_wb=0.0,
      r_bn=0.3, first_bn_multiplier=1.0, bn_targets=(targets.bn_mean, targets.bn_var))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_per_image_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("wb", [True, False])
def test_running_bn_rows_equal_data_synthesis_transcription(nets, data, wb):
  # Wass+BN (wb) and CE+BN (= SRe2L): data_synthesis.py, one image of each class per batch,
  # the teacher's running statistics, first-BN multiplier 10.
  net, model, variables, _ = nets
  targets, _ = data
  rmean, rvar = running_statistics(model, variables, (HW, HW, 3))
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for a, b, m in zip(rmean, rvar, bns):  # our running statistics are the module's buffers
    np.testing.assert_array_equal(np.asarray(a), m.running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(b), m.running_var.numpy())
  slot = 1  # ipc_id: barycenter point 1 of every class
  ids = np.arange(NUM_CLASSES)
  images = np.random.default_rng(5).normal(size=(NUM_CLASSES, 1, HW, HW, 3)).astype(np.float32)
  slot_targets = targets._replace(features=targets.features[:, slot:slot + 1],
                                  running_mean=rmean, running_var=rvar)
  options = RecoverOptions(objective="official", bn_stats="running", first_bn_multiplier=10.0,
                           r_bn=0.05, feature_target="barycenter" if wb else "none",
                           r_ce=0.0 if wb else 1.0)
  key = jax.random.key(8)
  loss, grad = ours(model, variables, images, slot_targets, ids, key, options)
  ref_loss, ref_grad = official_loss(
      net, images, slot_targets, ids, key, options, per_class_bn=False, wb=wb, r_wb=0.0,
      r_bn=0.05, first_bn_multiplier=10.0, bary=np.asarray(slot_targets.features))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_per_image_close(grad, ref_grad, 1e-5)


def test_objectives_agree_on_one_class_chunks(nets, data):
  net, model, variables, _ = nets
  targets, images = data
  key = jax.random.key(2)
  for c in (1,):  # one compile per objective; any single class shows it
    ids = CHUNK[c:c + 1]
    a = ours(model, variables, images[c:c + 1], targets, ids, key,
             RecoverOptions(objective="official", r_bn=0.7, r_ce=0.4))
    b = ours(model, variables, images[c:c + 1], targets, ids, key,
             RecoverOptions(objective="per_class", r_bn=0.7, r_ce=0.4))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-7)
