"""ImageNet-1K (1000 classes, 1.28M train / 50k validation, resized to 224 px).

    python experiments/pretrain.py --config experiments/configs/imagenet.py --workdir runs/imagenet
    python experiments/distill.py --config experiments/configs/imagenet.py --workdir runs/imagenet
Debug variant: add ``--config.debug=True``.

Needs TFDS ``imagenet2012`` prepared (manual download) in the TFDS data dir. Images are stored
resized (shorter side 224, centre crop); training streams them (the split does not fit in memory)
and is data-parallel over all local devices.

Teacher: ResNet-18 (ImageNet stem), 90 epochs, batch 256, SGD lr 0.1 cosine, weight decay 1e-4,
RandomResizedCrop + flip: expected ~70% validation top-1 (torchvision's recipe gives 69.8%).
Runtime: many GPU-hours (torchvision trained it for ~a day on 8 GPUs); not for CPU. WMDD uses
torchvision's pretrained ResNet-18: convert those weights into a teacher checkpoint and set
``--config.teacher.checkpoint=<dir>`` to skip training.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.dataset.spec = "tfds:imagenet2012"
  c.dataset.options = {"resize": 224}
  c.dataset.train_split = "train"
  c.dataset.test_split = "validation"
  c.teacher.update(dict(
      model="resnet18", model_options={"stem": "imagenet"}, checkpoint="",
      epochs=90, batch_size=256, learning_rate=0.1, momentum=0.9, nesterov=False,
      weight_decay=1e-4, decay_norm_and_bias=True, warmup_epochs=0.0, label_smoothing=0.0,
      crop_padding=0, flip=True, resized_crop=True,
      eval_every=5, eval_batch_size=250,
  ))
  return c
