"""WMDD on scikit-learn's 8x8 digits (10 classes, 1347 train / 450 test): the `make demo` config.

Whole pipeline (this is what `make demo` runs, once per method):
    python experiments/distill.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/distill.py --config experiments/configs/digits.py \\
        --workdir runs/digits_random --config.method=random
Teacher only:
    python experiments/pretrain.py --config experiments/configs/digits.py --workdir runs/digits
Debug variant (seconds, same code paths): add ``--config.debug=True``.

Teacher: ConvNet-D3 (width 64; 8x8 -> 1x1, 64 features), 30 epochs of SGD, ~10 s on 2 CPU cores,
~98% test top-1. Recover: 1000 steps, r_bn 1 (tuned by hand on this set; docs/method.md's default
10 is for ResNet-18's 20 BN layers), milder crops than ImageNet's 0.08: 8 px images have no room.
Expected student test top-1 at IPC 10 (seed 0, measured on the 2-core CPU, ~50 s for both
methods): wmdd ~85%, random real images ~74%.
"""

from wmdd_jax.config import default_config


def get_config():
  c = default_config()  # IPC 10, seed 0, ConvNet-D3 teacher and student, 300 student epochs
  c.dataset.spec = "digits"
  c.teacher.model_options = {"width": 64}
  c.teacher.batch_size = 64
  c.teacher.learning_rate = 0.05
  # Digits are not mirror-symmetric: shifts of one pixel only.
  c.teacher.crop_padding = 1
  c.teacher.flip = False
  c.recover.iterations = 1000
  c.recover.r_bn = 1.0
  # 8 px images: a 0.08-area crop keeps under 3x3 pixels, so crops stay at half the area or more.
  c.recover.crop_scale = (0.5, 1.0)
  c.eval.crop_scale = (0.5, 1.0)
  return c
