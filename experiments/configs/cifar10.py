"""CIFAR-10 (10 classes, 50k train / 10k test, 32x32 RGB).

    python experiments/pretrain.py --config experiments/configs/cifar10.py --workdir runs/cifar10
    python experiments/distill.py --config experiments/configs/cifar10.py --workdir runs/cifar10
Debug variant: add ``--config.debug=True``.

Needs the TFDS ``cifar10`` dataset prepared in the TFDS data dir (or pass
``--config.dataset.spec=npz:<file>`` / ``folder:<root>``).

Teacher: ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool), 200 epochs, batch 128, SGD
lr 0.1 cosine, weight decay 5e-4, pad-4 crop + flip: the standard recipe, expected ~95% test
top-1. Runtime: roughly 1-2 h on one modern GPU; days on 2 CPU cores (not meant for CPU).
"""

from wmdd_jax.config import default_config


def get_config():
  c = default_config()
  c.dataset.spec = "tfds:cifar10"
  # Teacher: the defaults (batch 128, SGD lr 0.1 momentum 0.9 cosine, wd 5e-4, pad-4 crop +
  # flip) on ResNet-18 with the CIFAR stem, for 200 epochs.
  c.teacher.model = "resnet18"
  c.teacher.model_options = {"stem": "cifar"}
  c.teacher.epochs = 200
  c.teacher.eval_every = 10
  return c
