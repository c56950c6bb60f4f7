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
Recover and student: the DESIGN / official defaults (objective "official", Adam 0.25, crops
0.08-1, student AdamW 1e-3, T 20, 300 epochs) except r_bn = 1 (ConvNet-D3 has 3 BN layers,
as on digits / Fashion-MNIST; not tuned here) and 1000 recover iterations. Runtime on 2 CPU cores:
about 10 min per IPC-10 cell. Nothing in this config was tuned on x_test.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.ipc = 10
  c.dataset.spec = "npz:../shared/datasets/cifar10-dev/cifar10-dev.npz"
  c.dataset.options = {"val_fraction": 0.0}  # > 0 holds out a "val" split for tuning
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.teacher.update(dict(
      model="convnet_d3", model_options={}, checkpoint="",
      epochs=20, batch_size=128, learning_rate=0.05, momentum=0.9, nesterov=False,
      weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=0.0, label_smoothing=0.0,
      crop_padding=4, flip=True, resized_crop=False,
      eval_every=5, eval_batch_size=500,
  ))
  c.recover.iterations = 1000
  c.recover.r_bn = 1.0
  return c
