"""CIFAR-100 (100 classes, 50k train / 10k test, 32x32 RGB).

    python experiments/pretrain.py --config experiments/configs/cifar100.py --workdir runs/cifar100
    python experiments/distill.py --config experiments/configs/cifar100.py --workdir runs/cifar100
Debug variant: add ``--config.debug=True``.

Needs the TFDS ``cifar100`` dataset prepared in the TFDS data dir (or ``npz:`` / ``folder:``).

Teacher: ResNet-18 with the CIFAR stem, 200 epochs, batch 128, SGD lr 0.1 cosine, weight decay
5e-4, pad-4 crop + flip; expected ~77-78% test top-1. Runtime: roughly 1-2 h on one modern GPU;
not meant for CPU.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.dataset.spec = "tfds:cifar100"
  c.dataset.options = {}
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.teacher.update(dict(
      model="resnet18", model_options={"stem": "cifar"}, checkpoint="",
      epochs=200, batch_size=128, learning_rate=0.1, momentum=0.9, nesterov=False,
      weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=0.0, label_smoothing=0.0,
      crop_padding=4, flip=True, resized_crop=False,
      eval_every=10, eval_batch_size=500,
  ))
  return c
