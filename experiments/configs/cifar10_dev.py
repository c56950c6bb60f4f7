"""cifar10-dev: 10,000 real CIFAR-10 training images (8000 train / 2000 dev), 32x32 RGB.

    python experiments/distill.py --config experiments/configs/cifar10_dev.py --workdir runs/c10d
    python -m bench.paper_table --table 3 --config experiments/configs/cifar10_dev.py
Debug variant: add ``--config.debug=True``.

Data: ``../shared/datasets/cifar10-dev/cifar10-dev.npz`` seen from the repository root (its
README: every image comes from CIFAR-10's *training* split; ``x_test`` is a development score,
not CIFAR-10's test split). Tune on a held-out part of the train arrays
(``--config.dataset.options.val_fraction=0.1 --config.dataset.test_split=val``), never on
``x_test``.

Teacher: ConvNet-D3 (width 128, the DD literature's network), 20 epochs, batch 128, SGD lr 0.05
cosine, weight decay 5e-4, pad-4 crop + flip: a CPU-sized teacher (~10 min on 2 cores).
Recover and student: the docs/method.md / official defaults (objective "official", Adam 0.25, crops
0.08-1, student AdamW 1e-3, T 20, 300 epochs) except r_bn = 1 (ConvNet-D3 has 3 BN layers,
as on digits / Fashion-MNIST) and 1000 recover iterations, and every recover method starts from
real images (``recover.init="real"``: the IPC images per class that method "random" evaluates with
the same seed, so each method's gain over random real images is a paired difference).
Runtime on 2 CPU cores: about 10 min per IPC-10 cell. Nothing in this config was tuned on x_test.

Why (issue 14's screening study, bench/results/study_cifar10_dev.json; validation = a stratified
10% of x_train held out from the teacher too; reduced settings: 500 recover iterations, 200
student epochs; IPC 10; val top-1 per seed 0 / 1):
  random real 46.0 / 46.6; WMDD from noise 45.6 / -; WMDD from real 46.9 / 47.8 (+0.9 / +1.1 paired
  over random): init "real". Recover crops 0.5-1 from real 45.8 / 48.5 vs 0.08-1 46.9 / 47.8: no
  evidence to leave the official 0.08-1. r_bn 0.3 / 3 from real: 44.5 / 48.5 and 46.5 / 48.1 vs
  r_bn 1's 46.9 / 47.8: r_bn stays 1. SRe2L (CE+BN) from real 51.1 / 46.3: not beaten by WMDD
  here (see the study's findings). ``:resnet18`` variant: ResNet-18 with the CIFAR stem, for a
  lent GPU (bench/accuracy_gpu.sh).
"""

from wmdd_jax.config import default_config


def get_config(variant: str = ""):
  """``variant``: "" (ConvNet-D3), "pooled" (ConvNet-D3 whose features, for the barycenter and
  the feature loss, are the last map's spatial mean: issue 14's study) or "resnet18" (ResNet-18,
  CIFAR stem, teacher and student), e.g.
  ``--config experiments/configs/cifar10_dev.py:resnet18``."""
  if variant not in ("", "pooled", "resnet18"):
    raise ValueError(f"cifar10_dev.py: unknown variant {variant!r}; use '', 'pooled' or "
                     "'resnet18'.")
  c = default_config()
  c.dataset.spec = "npz:../shared/datasets/cifar10-dev/cifar10-dev.npz"
  c.dataset.options = {"val_fraction": 0.0}  # > 0 holds out a "val" split for tuning
  # Teacher: the default ConvNet-D3 recipe (batch 128, pad-4 crop + flip), 20 epochs at lr 0.05.
  c.teacher.epochs = 20
  c.teacher.learning_rate = 0.05
  c.recover.iterations = 1000
  c.recover.r_bn = 1.0
  # Every recover method starts from the IPC real images that method "random" evaluates
  # (bench/results/study_cifar10_dev.json: WMDD from noise 45.6, from real 47.3 vs random 46.3).
  c.recover.init = "real"
  if variant == "pooled":  # the same network and teacher checkpoint; only its features differ
    c.teacher.model_options = {"features": "pooled"}
  if variant == "resnet18":
    c.teacher.model = "resnet18"
    c.teacher.model_options = {"stem": "cifar"}
  return c
