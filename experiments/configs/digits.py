"""WMDD on scikit-learn's 8x8 digits (real, bundled, offline): the `make demo` config.

Command:
    python experiments/distill.py --config experiments/configs/digits.py --workdir runs/digits
    (debug, seconds: add --config.debug=True; baseline: --config.method=random)
Expected runtime on a 2-core CPU: about 1-2 minutes per method (teacher ~15 s).
Expected accuracy (IPC 10, seed 0): teacher ~97% test top-1; see README's demo table for the
measured wmdd and random student figures.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.dataset.spec = "digits"
  c.ipc = 10
  c.teacher.model = "convnet_d3"
  c.teacher.model_options = {"width": 64}
  c.teacher.epochs = 30
  c.teacher.batch_size = 64
  c.teacher.learning_rate = 0.05
  c.teacher.crop_padding = 1
  c.stats.batch_size = 256
  # 8 px images: the 0.08 minimum crop of ImageNet keeps under 3x3 pixels, so crop milder.
  c.recover.iterations = 1000
  c.recover.r_bn = 1.0
  c.recover.crop_scale = (0.5, 1.0)
  c.eval.epochs = 300
  c.eval.crop_scale = (0.5, 1.0)
  c.eval.eval_every = 25
  return c
