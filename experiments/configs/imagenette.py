"""ImageNette (10 easy ImageNet classes, ~9.5k train / ~3.9k validation, resized to 224 px).

    python experiments/pretrain.py --config experiments/configs/imagenette.py \\
        --workdir runs/imagenette
    python experiments/distill.py --config experiments/configs/imagenette.py \\
        --workdir runs/imagenette
Debug variant: add ``--config.debug=True``.

Needs TFDS ``imagenette/320px-v2`` prepared in the TFDS data dir (or a ``folder:`` copy with
``train``/``validation`` splits). Images are stored resized (shorter side 224, centre crop).

Teacher: ResNet-18 with the ImageNet stem (7x7/2 conv + max-pool), 100 epochs, batch 128, SGD
lr 0.1 cosine with 2 warm-up epochs, weight decay 5e-4, RandomResizedCrop + flip. Expected
roughly 90% validation top-1. Runtime: about 1 h on one modern GPU; not meant for CPU.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.dataset.spec = "tfds:imagenette/320px-v2"
  c.dataset.options = {"resize": 224}
  c.dataset.train_split = "train"
  c.dataset.test_split = "validation"
  c.teacher.update(dict(
      model="resnet18", model_options={"stem": "imagenet"}, checkpoint="",
      epochs=100, batch_size=128, learning_rate=0.1, momentum=0.9, nesterov=False,
      weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=2.0, label_smoothing=0.0,
      crop_padding=0, flip=True, resized_crop=True,
      eval_every=5, eval_batch_size=250,
  ))
  return c
