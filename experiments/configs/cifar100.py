"""CIFAR-100 (100 classes, 50k train / 10k test, 32x32 RGB).

    python experiments/pretrain.py --config experiments/configs/cifar100.py --workdir runs/cifar100
    python experiments/distill.py --config experiments/configs/cifar100.py --workdir runs/cifar100
Debug variant: add ``--config.debug=True``.

Needs the TFDS ``cifar100`` dataset prepared in the TFDS data dir (or ``npz:`` / ``folder:``).

Teacher: ResNet-18 with the CIFAR stem, 200 epochs, batch 128, SGD lr 0.1 cosine, weight decay
5e-4, pad-4 crop + flip; expected ~77-78% test top-1. Runtime: roughly 1-2 h on one modern GPU;
not meant for CPU.
"""

from wmdd_jax.config import default_config


def get_config():
  c = default_config()
  c.dataset.spec = "tfds:cifar100"
  # Teacher: the defaults (batch 128, SGD lr 0.1 momentum 0.9 cosine, wd 5e-4, pad-4 crop +
  # flip) on ResNet-18 with the CIFAR stem, for 200 epochs.
  c.teacher.model = "resnet18"
  c.teacher.model_options = {"stem": "cifar"}
  c.teacher.epochs = 200
  c.teacher.eval_every = 10
  return c
