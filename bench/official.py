"""Benchmark: the official WMDD code's work, transcribed to PyTorch, against this library's.

    .venv/bin/pip install -e '.[bench]'      # torch (CPU build) for the transcription
    .venv/bin/python -m bench.official                        # both works, 5 interleaved rounds
    .venv/bin/python -m bench.official --work recover_iteration --rounds 3 --steps 2
    .venv/bin/python -m bench.official --classes 2 --ipc 1 --hw 8 --rounds 1 --steps 1 \\
        --out /tmp/o.json                                     # smoke (tiny shapes)

Two works, each on the same shapes in both frameworks (ResNet-18 with the CIFAR stem, 10 classes
x IPC 10 = 100 images of 32x32x3 by default):

* ``recover_iteration``: one iteration of the official recover loop
  (recover/data_synthesis_new.py ``get_images`` with ``--wb --per-class-bn``, as run.sh runs
  WMDD): cosine learning rate, one RandomResizedCrop(0.08-1) + flip + circular roll drawn for the
  whole batch (torchvision on the batch tensor), the teacher's forward in eval mode with forward
  hooks on every BN layer (recover/utils.py ``BNFeatureHook_new``: per-class mean and variance of
  the layer's input against the per-class targets) and on the average pool (``EmbedderHook``),
  CE * r_wb + ||F - B||_F + r_bn * sum of the BN terms, backward, Adam(0.5, 0.9), the per-channel
  clip, and the ``loss.item()`` / best-image copy of the loop; NCHW float32, as the official code
  runs. Ours: :func:`wmdd_jax.recover.make_update_fn`'s ``step`` (the library's jitted step,
  ``objective="official"``), compiled by the execution layer as :func:`wmdd_jax.recover.recover`
  compiles it.
* ``student_step``: one step of the official student training with its soft labels
  (relabel/generate_soft_label.py + train/train_FKD.py, ``--mix-type cutmix``): per-image
  RandomResizedCrop(0.08-1) + flip (done on tensors here; the official DataLoader does it with
  PIL in worker processes), CutMix with one box per batch, the teacher's logits in eval mode on
  the mixed batch (the official code stores them in a separate pass over the same views: the same
  work), the student in train mode, KL(softmax(t/T) || softmax(s/T)) summed over classes times
  the normalised barycenter weights, backward, AdamW(1e-3, wd 0.01, no decay on BN/bias), and the
  loop's top-1/top-5 and ``loss.item()``. Ours: :func:`wmdd_jax.evaluate.make_student_step`
  (views, soft labels, the KD loss and AdamW in one jitted program), as
  :func:`wmdd_jax.evaluate.train_student` runs it.

How it is timed: a parent process starts one worker per framework (``--worker torch`` /
``--worker jax``), each builds and warms up every program first, then the parent asks them in
turn, round after round (interleaved, so drift on the shared machine hits both alike), for
``--steps`` timed iterations; a worker that is not asked waits on its pipe. Both use
``--threads`` threads (default: every core; PyTorch ``set_num_threads``, XLA:CPU's pool is
sized by the cores the process may run on, which the worker restricts with
``sched_setaffinity``). The figures are medians over all timed iterations of all rounds.

Variants of ours measure each optimisation of issue 15 before and after, in the same rounds
(``changes`` in the results): ``ours`` is the library as it runs now; ``ours_xla_defaults``
compiles the same programs with XLA's default options (``ExecutionOptions(compiler_options=
"none")``: YNNPACK convolution fusion on); ``ours_autodiff_moments`` (recover) takes the BN-input
moments as ``jnp.mean`` under autodiff (:func:`wmdd_jax.models.base.reference_moments`) instead
of :func:`~wmdd_jax.models.base.spatial_moments`; ``ours_flax_batchnorm`` (student) uses flax's
``nn.BatchNorm`` in train mode instead of the models' own; ``ours_before`` all of these at once,
i.e. the library before issue 15. Results go to ``bench/results/official.json``
(``official_<backend>.json`` off CPU), rendered into docs/benchmarks.md by
``python -m bench.render_docs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.common import RESULTS_DIR, ROOT

WORKS = ("recover_iteration", "student_step")
# Variants of ours: name -> (ExecutionOptions.compiler_options, BN-input moments, train-mode
# BatchNorm, the works it differs on, what it is). "autodiff" moments:
# models.base.reference_moments (jnp.mean under autodiff) instead of spatial_moments; "flax"
# BatchNorm: nn.BatchNorm instead of models.base._BatchNorm; both as before issue 15.
OURS_VARIANTS = {
    "ours": ("auto", "fast", "fast", WORKS, "the library as it runs now"),
    "ours_xla_defaults": ("none", "fast", "fast", WORKS,
                          "XLA's default compile options (YNNPACK convolution fusion on)"),
    "ours_autodiff_moments": ("auto", "autodiff", "fast", ("recover_iteration",),
                              "the BN-input moments as jnp.mean under autodiff"),
    "ours_flax_batchnorm": ("auto", "fast", "flax", ("student_step",),
                            "train-mode BatchNorm by flax's nn.BatchNorm"),
    "ours_before": ("none", "autodiff", "flax", WORKS, "all three: the library before issue 15"),
}
# Each change of issue 15 as (the variant without it, what changed); "after" is always "ours".
CHANGES = (
    ("ours_xla_defaults", "per-program XLA:CPU compile options (ExecutionOptions."
     "compiler_options='auto': no YNNPACK convolution fusion for recover and student steps)"),
    ("ours_autodiff_moments", "BN-input moments by pairwise sums with a closed-form gradient "
     "(models.base.spatial_moments) instead of jnp.mean under autodiff"),
    ("ours_flax_batchnorm", "train-mode BatchNorm statistics by pairwise sums with a "
     "closed-form gradient (models.base._BatchNorm) instead of flax's nn.BatchNorm"),
    ("ours_before", "all of issue 15's changes together"),
)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's


def _shape(args) -> dict:
  return {"model": "resnet18", "stem": args.stem, "classes": args.classes, "ipc": args.ipc,
          "images_per_step": args.classes * args.ipc, "image": [args.hw, args.hw, 3]}


# ---------------------------------------------------------------------------------------------
# The PyTorch transcription of the official code.


def _torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit(
        "bench/official.py needs PyTorch for the official transcription: "
        "`.venv/bin/pip install -e '.[bench]'` (or `pip install torch==2.13.0+cpu "
        "--index-url https://download.pytorch.org/whl/cpu`).") from e
  return torch


def torch_resnet18(num_classes: int, stem: str):
  """torchvision's resnet18 topology (BasicBlock, v1.5) with the official stems, NCHW.

  ``cifar``: 3x3/1 conv, no max-pool; ``tiny_official``: 3x3/2 conv padding 3, no max-pool
  (recover/data_synthesis_new.py); ``imagenet``: 7x7/2 + max-pool.
  """
  torch = _torch()
  nn = torch.nn

  class Block(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = None
      if stride != 1 or cin != planes:
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      kernel, stride, pad = {"imagenet": (7, 2, 3), "tiny_official": (3, 2, 3)}.get(
          stem, (3, 1, 1))
      self.conv1 = nn.Conv2d(3, 64, kernel, stride, pad, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
      layers, cin = [], 64
      for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        layers.append(nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
        cin = planes
      self.layer1, self.layer2, self.layer3, self.layer4 = layers
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  return Net()


def _rrc_params(height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) from torch's RNG."""
  torch = _torch()
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      i = torch.randint(0, height - h + 1, size=(1,)).item()
      j = torch.randint(0, width - w + 1, size=(1,)).item()
      return i, j, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resized_crop(x, size: int):
  """torchvision's RandomResizedCrop on a tensor (bilinear, antialias) of [..., C, H, W]."""
  torch = _torch()
  i, j, h, w = _rrc_params(x.shape[-2], x.shape[-1])
  crop = x[..., i:i + h, j:j + w]
  squeeze = crop.dim() == 3
  out = torch.nn.functional.interpolate(crop[None] if squeeze else crop, size=(size, size),
                                        mode="bilinear", align_corners=False, antialias=True)
  return out[0] if squeeze else out


def _hflip(x):
  torch = _torch()
  return torch.flip(x, dims=[-1]) if torch.rand(1).item() < 0.5 else x


class OfficialRecover:
  """One official recover iteration (data_synthesis_new.py ``get_images``, one loop pass)."""

  def __init__(self, args):
    torch = _torch()
    torch.manual_seed(0)
    random.seed(0)
    self.torch, self.args = torch, args
    self.net = torch_resnet18(args.classes, args.stem).float().eval()
    for p in self.net.parameters():
      p.requires_grad = False
    n, k, hw = args.classes, args.ipc, args.hw
    self.iterations = 2000
    self.lr, self.r_bn, self.r_wb, self.jitter = 0.25, 0.01, 1.0, hw // 7
    self.targets = torch.arange(n).repeat_interleave(k)
    self.bc = torch.rand(n, k, 512).abs().view(n * k, 512)
    self.inputs = torch.randn((n * k, 3, hw, hw), requires_grad=True)
    self.optimizer = torch.optim.Adam([self.inputs], lr=self.lr, betas=[0.5, 0.9], eps=1e-8)
    self.criterion = torch.nn.CrossEntropyLoss()
    self.bn_terms, self.hooks = [], []
    for module in self.net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        ch = module.num_features
        # BatchNorm2dWithPerClassStats' per-class buffers (random but well-shaped).
        module.running_mean_per_class = torch.randn(n, ch).abs()
        module.running_var_per_class = torch.randn(n, ch).abs() + 0.5
        self.hooks.append(module.register_forward_hook(self._bn_hook))
    self.net.avgpool.register_forward_hook(self._feature_hook)
    self.feature = None
    self.best_cost, self.step = 1e4, 0

  def _bn_hook(self, module, inputs, output):
    # recover/utils.py BNFeatureHook_new, per-class branch.
    del output
    num_cls, ipc = self.args.classes, self.args.ipc
    _, nch, h, w = inputs[0].shape
    inp = inputs[0].view(num_cls, ipc, nch, h, w)
    mean = inp.mean([1, 3, 4])
    var = inp.var([1, 3, 4], unbiased=False)
    diff_var = module.running_var_per_class.data[0:num_cls] - var
    diff_mean = module.running_mean_per_class.data[0:num_cls] - mean
    self.bn_terms.append(self.torch.norm(diff_var, dim=1).mean()
                         + self.torch.norm(diff_mean, dim=1).mean())

  def _feature_hook(self, module, inputs, output):
    del module, inputs
    self.feature = output.view(output.shape[0], -1)

  def __call__(self) -> None:
    torch, it = self.torch, self.step % self.iterations
    lr = 0.5 * (1 + math.cos(math.pi * it / self.iterations)) * self.lr  # lr_cosine_policy
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    inputs_jit = _hflip(_resized_crop(self.inputs, self.args.hw))
    off1, off2 = random.randint(0, self.jitter), random.randint(0, self.jitter)
    inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
    self.optimizer.zero_grad()
    self.bn_terms = []
    outputs = self.net(inputs_jit)
    loss_ce = self.criterion(outputs, self.targets) * self.r_wb
    loss_main = loss_ce + torch.norm(self.feature - self.bc, 2)
    rescale = [1.0] + [1.0] * (len(self.bn_terms) - 1)
    loss_r_bn = sum(t * s for t, s in zip(self.bn_terms, rescale))
    loss = loss_main + self.r_bn * loss_r_bn
    loss.backward()
    self.optimizer.step()
    with torch.no_grad():  # utils.clip: per channel, back to [0, 1] pixels
      for c in range(3):
        m, s = MEAN[c], STD[c]
        self.inputs.data[:, c] = torch.clamp(self.inputs.data[:, c], -m / s, (1 - m) / s)
    value = loss.item()
    if self.best_cost > value or it == 1:
      self.best_inputs = self.inputs.data.clone()
    self.step += 1


class OfficialStudent:
  """One official student step with its soft labels (generate_soft_label.py + train_FKD.py)."""

  def __init__(self, args):
    torch = _torch()
    torch.manual_seed(1)
    self.torch, self.args = torch, args
    n = args.classes * args.ipc
    self.images = torch.randn(n, 3, args.hw, args.hw)
    self.labels = torch.arange(args.classes).repeat_interleave(args.ipc)
    self.weights = torch.rand(n) + 0.5
    self.teacher = torch_resnet18(args.classes, args.stem).float().eval()
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.model = torch_resnet18(args.classes, args.stem).float().train()
    # train/utils.py get_parameters: decay on weights of dim > 1 only.
    decay = [p for name, p in self.model.named_parameters()
             if "weight" in name and p.dim() > 1]
    other = [p for name, p in self.model.named_parameters()
             if not ("weight" in name and p.dim() > 1)]
    self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.}],
                                       lr=1e-3, weight_decay=0.01)
    self.kl = torch.nn.KLDivLoss(reduction="none")
    self.temperature = 20.0

  def _views(self):
    # The DataLoader's per-image RandomResizedCrop + RandomHorizontalFlip (official: PIL).
    return self.torch.stack([_hflip(_resized_crop(x, self.args.hw)) for x in self.images])

  def _cutmix(self, images):
    # relabel/utils_fkd.py cutmix (fkd_save): one box for the batch, a random permutation.
    torch = self.torch
    rand_index = torch.randperm(images.size()[0])
    lam = np.random.beta(1.0, 1.0)
    w, h = images.size(2), images.size(3)
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut_rat), int(h * cut_rat)
    cx, cy = np.random.randint(w), np.random.randint(h)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cy - cut_h // 2, 0, h)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, w), np.clip(cy + cut_h // 2, 0, h)
    images[:, :, bbx1:bbx2, bby1:bby2] = images[rand_index, :, bbx1:bbx2, bby1:bby2]
    return images

  def __call__(self) -> None:
    torch = self.torch
    images = self._cutmix(self._views())
    with torch.no_grad():  # generate_soft_label.py save(): the teacher on the mixed views
      soft_label = self.teacher(images).float()
    self.model.train()
    self.optimizer.zero_grad()
    output = self.model(images)
    top = min(5, output.shape[1])  # train_FKD.py's accuracy(output, target, topk=(1, 5))
    _, pred = output.topk(top, 1, True, True)
    correct = pred.t().eq(self.labels.reshape(1, -1).expand_as(pred.t()))
    _ = correct[:1].reshape(-1).float().sum(0), correct[:top].reshape(-1).float().sum(0)
    output = torch.nn.functional.log_softmax(output / self.temperature, dim=1)
    soft = torch.nn.functional.softmax(soft_label / self.temperature, dim=1)
    loss = torch.sum(self.kl(output, soft), dim=1)
    weights = self.weights / torch.mean(self.weights)
    loss = torch.mean(loss * weights)
    loss.backward()
    self.optimizer.step()
    loss.item()


def _torch_worker(args):
  torch = _torch()
  torch.set_num_threads(args.threads)
  works = {"recover_iteration": OfficialRecover, "student_step": OfficialStudent}
  return {(w, "official"): works[w](args) for w in args.work.split(",")}, torch.__version__


# ---------------------------------------------------------------------------------------------
# Ours: the library's programs.


class OursRecover:
  """The library's recover step (``make_update_fn(...).step``), one call per iteration."""

  def __init__(self, args, compiler_options: str):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from bench.common import random_recover_targets  # noqa: PLC0415
    from wmdd_jax import recover as recover_lib  # noqa: PLC0415
    from wmdd_jax.distributed import ExecutionOptions, make_execution  # noqa: PLC0415
    from wmdd_jax.models import get_model, init_model  # noqa: PLC0415

    self.jax = jax
    shape = (args.hw, args.hw, 3)
    model = get_model("resnet18", args.classes, stem=args.stem)
    self.variables = init_model(model, jax.random.key(0), shape)
    targets = random_recover_targets(model, self.variables, args.classes, args.ipc, shape)
    execution = make_execution(ExecutionOptions(mesh="off", compiler_options=compiler_options))
    options = recover_lib.RecoverOptions(iterations=2000, r_bn=0.01, objective="official")
    ids = jnp.arange(args.classes, dtype=jnp.int32)
    self.ids = ids
    self.targets = jax.tree.map(jnp.asarray, targets.take(np.arange(args.classes)))
    self.step_fn = recover_lib.make_update_fn(model, options, MEAN, STD,
                                              execution=execution).step
    self.state = recover_lib.init_state(
        recover_lib.init_images(jax.random.key(1), ids, args.ipc, shape), options)
    self.key = jax.random.key(2)

  def __call__(self) -> None:
    self.state, metrics = self.step_fn(self.state, self.variables, self.targets, self.ids,
                                       self.key)
    self.jax.block_until_ready(metrics["loss"])


class OursStudent:
  """The library's student step (:func:`wmdd_jax.evaluate.make_student_step`)."""

  def __init__(self, args, compiler_options: str):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from wmdd_jax import evaluate, training  # noqa: PLC0415
    from wmdd_jax.distributed import ExecutionOptions, make_execution  # noqa: PLC0415
    from wmdd_jax.models import get_model, init_model  # noqa: PLC0415
    from wmdd_jax.relabel import stream_keys  # noqa: PLC0415

    self.jax = jax
    shape = (args.hw, args.hw, 3)
    n = args.classes * args.ipc
    teacher = get_model("resnet18", args.classes, stem=args.stem)
    student = get_model("resnet18", args.classes, stem=args.stem)
    self.teacher_variables = jax.device_put(init_model(teacher, jax.random.key(0), shape))
    execution = make_execution(ExecutionOptions(mesh="off", compiler_options=compiler_options))
    options = evaluate.EvaluateOptions(batch_size=n, progress=False)
    self.step_fn = evaluate.make_student_step(student, teacher, options, execution)
    variables = init_model(student, jax.random.key(1), shape)
    self.state = execution.place(training.create_train_state(
        student, variables, evaluate.make_optimizer(options, 1)), copy=True)
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32))
    self.weights = jnp.asarray(rng.uniform(0.5, 1.5, n).astype(np.float32))
    _, self.shuffle_key, self.views_key = stream_keys(jax.random.key(3))
    self.n, self.epoch = n, 0

  def __call__(self) -> None:
    idx = np.asarray(self.jax.random.permutation(
        self.jax.random.fold_in(self.shuffle_key, self.epoch), self.n), np.int32)
    self.state, loss = self.step_fn(
        self.state, (self.teacher_variables,),
        (self.images, self.weights, idx, self.views_key, np.int32(self.epoch), np.int32(0)),
        self.views_key, np.int32(0))
    self.jax.block_until_ready(loss)
    self.epoch += 1


def _jax_worker(args):
  import jax  # noqa: PLC0415

  from wmdd_jax.models import base  # noqa: PLC0415

  works = {"recover_iteration": OursRecover, "student_step": OursStudent}
  programs = {}
  fast = base.spatial_moments
  for work in args.work.split(","):
    for variant in args.variants.split(","):
      compiler, moments, batch_norm, applies, _ = OURS_VARIANTS[variant]
      if work not in applies:
        continue
      # Both are read when the step is traced (its first call), so the swap only holds while
      # this variant is built and warmed up.
      base.spatial_moments = base.reference_moments if moments == "autodiff" else fast
      base.FAST_BATCH_NORM = batch_norm == "fast"
      try:
        program = works[work](args, compiler)
        program()
        program()
      finally:
        base.spatial_moments = fast
        base.FAST_BATCH_NORM = True
      programs[(work, variant)] = program
  return programs, jax.__version__


# ---------------------------------------------------------------------------------------------
# Worker and parent.


def worker(args) -> None:
  """Builds every program, warms each up twice, then serves ``run <work> <variant> <n>``."""
  if args.threads < (os.cpu_count() or 1):
    os.sched_setaffinity(0, set(range(args.threads)))
  t0 = time.perf_counter()
  programs, version = (_torch_worker if args.worker == "torch" else _jax_worker)(args)
  if args.worker == "torch":  # ours were warmed up (compiled) as they were built
    for program in programs.values():
      program()
      program()
  print(json.dumps({"ready": True, "setup_s": time.perf_counter() - t0, "version": version}),
        flush=True)
  for line in sys.stdin:
    parts = line.split()
    if not parts or parts[0] == "quit":
      break
    _, work, variant, n = parts
    times, cpu = [], []
    for _ in range(int(n)):
      t, c = time.perf_counter(), time.process_time()
      programs[(work, variant)]()
      times.append(1000 * (time.perf_counter() - t))
      # CPU seconds of the worker (all its threads): less sensitive to other jobs than wall
      # time, though threads that spin while waiting count too.
      cpu.append(1000 * (time.process_time() - c))
    print(json.dumps({"ms": times, "cpu_ms": cpu}), flush=True)


def _start(kind: str, args) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "bench.official", "--worker", kind, "--work", args.work,
         "--variants", args.variants, "--classes", str(args.classes), "--ipc", str(args.ipc),
         "--hw", str(args.hw), "--stem", args.stem, "--threads", str(args.threads)]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
  return proc


def _ready(proc: subprocess.Popen, kind: str) -> dict:
  line = proc.stdout.readline()
  if not line:
    raise SystemExit(f"the {kind} worker exited before it was ready (see its error above)")
  return json.loads(line)


def _ask(proc: subprocess.Popen, work: str, variant: str, steps: int) -> dict:
  proc.stdin.write(f"run {work} {variant} {steps}\n")
  proc.stdin.flush()
  line = proc.stdout.readline()
  if not line:
    raise SystemExit(f"a worker died while running {work}/{variant}")
  return json.loads(line)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", default=",".join(WORKS), help=f"comma list of {WORKS}")
  parser.add_argument("--variants", default=",".join(OURS_VARIANTS),
                      help=f"comma list of our variants, of {tuple(OURS_VARIANTS)}")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed iterations per round")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--ipc", type=int, default=10)
  parser.add_argument("--hw", type=int, default=32, help="image side in pixels")
  parser.add_argument("--stem", default="cifar", help="cifar, tiny, tiny_official or imagenet")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="threads (cores) per framework")
  parser.add_argument("--out", default="", help="default bench/results/official.json")
  parser.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for work in args.work.split(","):
    if work not in WORKS:
      parser.error(f"unknown work {work!r}; choose from {WORKS}")
  for variant in args.variants.split(","):
    if variant not in OURS_VARIANTS:
      parser.error(f"unknown variant {variant!r}; choose from {tuple(OURS_VARIANTS)}")
  if args.worker:
    worker(args)
    return 0
  _torch()  # fail here, with the install hint, before starting anything
  import jax  # noqa: PLC0415

  from bench.common import machine, write_result  # noqa: PLC0415

  procs = {"torch": _start("torch", args), "jax": _start("jax", args)}
  try:
    setup = {kind: _ready(proc, kind) for kind, proc in procs.items()}
    works, variants = args.work.split(","), args.variants.split(",")
    configs = [(w, "torch", "official") for w in works]
    configs += [(w, "jax", v) for w in works for v in variants if w in OURS_VARIANTS[v][3]]
    times: dict[tuple[str, str], list[float]] = {(w, v): [] for w, _, v in configs}
    cpu: dict[tuple[str, str], list[float]] = {(w, v): [] for w, _, v in configs}
    rounds: dict[tuple[str, str], list[float]] = {(w, v): [] for w, _, v in configs}
    loads = []
    for r in range(args.rounds):
      # Alternate the order each round, so neither side always runs right after the other.
      order = configs if r % 2 == 0 else configs[::-1]
      for work, kind, variant in order:
        out = _ask(procs[kind], work, variant, args.steps)
        times[(work, variant)].extend(out["ms"])
        cpu[(work, variant)].extend(out["cpu_ms"])
        rounds[(work, variant)].append(statistics.median(out["ms"]))
      loads.append(os.getloadavg()[0])
      print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.1f}): " + ", ".join(
          f"{w}/{v} {rounds[(w, v)][-1]:.0f} ms" for w, _, v in configs), flush=True)
  finally:
    for proc in procs.values():
      try:
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        proc.kill()  # a worker that failed, or one still building while the other failed
        proc.wait()

  med = {k: statistics.median(v) for k, v in times.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  rows, changes = [], []
  for work in works:
    official = med[(work, "official")]
    row = {"work": work, "official_ms": official, "ours_ms": med.get((work, "ours")),
           "shape": _shape(args)}
    if row["ours_ms"] is not None:
      row["speedup"] = official / row["ours_ms"]
    mine = [v for v in variants if (work, v) in med]
    for variant in mine:
      if variant != "ours":
        row[f"{variant}_ms"] = med[(work, variant)]
    row["official_cpu_ms"] = med_cpu[(work, "official")]
    for variant in mine:
      row[f"{variant}_cpu_ms"] = med_cpu[(work, variant)]
    row["official_round_medians_ms"] = rounds[(work, "official")]
    if (work, "ours") in rounds:
      row["ours_round_medians_ms"] = rounds[(work, "ours")]
    rows.append(row)
    print(f"{work}: official {official:.0f} ms, " + ", ".join(
        f"{v} {med[(work, v)]:.0f} ms ({official / med[(work, v)]:.2f}x)" for v in mine))
    for before_variant, change in CHANGES:
      if (work, "ours") in med and (work, before_variant) in med:
        before, after = med[(work, before_variant)], med[(work, "ours")]
        changes.append({"work": work, "change": change, "before": before_variant,
                        "before_ms": before, "after_ms": after, "speedup": before / after,
                        "before_cpu_ms": med_cpu[(work, before_variant)],
                        "after_cpu_ms": med_cpu[(work, "ours")]})
  backend = jax.default_backend()
  out = args.out or os.path.join(
      RESULTS_DIR, "official.json" if backend == "cpu" else f"official_{backend}.json")
  write_result(out, {
      "benchmark": "the official WMDD code's recover iteration and student step (PyTorch "
                   "transcription, NCHW float32) against this library's, interleaved rounds",
      "rows": rows,
      "changes": changes,
      "variants": {v: OURS_VARIANTS[v][4] for v in variants},
      "timing": {"rounds": args.rounds, "steps_per_round": args.steps,
                 "threads": args.threads, "statistic": "median of every timed iteration",
                 "load_average_per_round": loads},
      "setup": setup,
      "machine": machine(torch=setup["torch"]["version"]),
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
