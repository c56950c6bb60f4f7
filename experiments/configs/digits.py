"""WMDD on scikit-learn's 8x8 digits (10 classes, 1347 train / 450 test): the `make demo` config.

Whole pipeline (this is what `make demo` runs, once per method):
    python experiments/distill.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/distill.py --config experiments/configs/digits.py \\
        --workdir runs/digits_random --config.method=random
Teacher only:
    python experiments/pretrain.py --config experiments/configs/digits.py --workdir runs/digits
Debug variant (seconds, same code paths): add ``--config.debug=True``.

Teacher: ConvNet-D3 (width 64; 8x8 -> 1x1, 64 features), 30 epochs of SGD, ~10 s on 2 CPU cores,
~98% test top-1. Recover: 1000 steps, r_bn 1 (tuned by hand on this set; the DESIGN default 10 is
for ResNet-18's 20 BN layers), milder crops than ImageNet's 0.08 because 8 px images have no room.
Expected student test top-1 at IPC 10 (seed 0, measured on the 2-core CPU, ~50 s for both
methods): wmdd ~85%, random real images ~74%.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.ipc = 10
  c.dataset.spec = "digits"
  c.dataset.options = {}
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.teacher.update(dict(
      model="convnet_d3", model_options={"width": 64}, checkpoint="",
      epochs=30, batch_size=64, learning_rate=0.05, momentum=0.9, nesterov=False,
      weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=0.0, label_smoothing=0.0,
      # Digits are not mirror-symmetric: shifts of one pixel only.
      crop_padding=1, flip=False, resized_crop=False,
      eval_every=5, eval_batch_size=500,
  ))
  c.stats.batch_size = 256
  c.recover.iterations = 1000
  c.recover.r_bn = 1.0
  # 8 px images: a 0.08-area crop keeps under 3x3 pixels, so crops stay at half the area or more.
  c.recover.crop_scale = (0.5, 1.0)
  c.eval.epochs = 300
  c.eval.crop_scale = (0.5, 1.0)
  c.eval.eval_every = 25
  return c
