"""Tiny-ImageNet (200 classes, 100k train / 10k val, 64x64 RGB).

    python experiments/pretrain.py --config experiments/configs/tiny_imagenet.py \\
        --workdir runs/tiny_imagenet
    python experiments/distill.py --config experiments/configs/tiny_imagenet.py \\
        --workdir runs/tiny_imagenet
Debug variant: add ``--config.debug=True``.

Data: an ImageFolder ``<root>/{train,test}/<wnid>/*.JPEG`` (reorganise the official
``val/images`` by ``val_annotations.txt`` into class folders and call the split ``test``); pass
``--config.dataset.spec=folder:<root>``.

Teacher: SRe2L's / WMDD's Tiny-ImageNet ResNet-18 (3x3/1 stem conv, no max-pool: stem
"tiny"), 50 epochs, batch 256, SGD lr 0.2 cosine, weight decay 1e-4, pad-4 crop + flip.
Expected roughly 60% val top-1 (what SRe2L reports for its teacher). Runtime: about 1 h on one
modern GPU; not meant for CPU.
"""

from wmdd_jax import pipeline


def get_config():
  c = pipeline.default_config()
  c.seed = 0
  c.debug = False
  c.dataset.spec = "folder:data/tiny-imagenet-200"
  c.dataset.options = {}
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.teacher.update(dict(
      model="resnet18", model_options={"stem": "tiny"}, checkpoint="",
      epochs=50, batch_size=256, learning_rate=0.2, momentum=0.9, nesterov=False,
      weight_decay=1e-4, decay_norm_and_bias=True, warmup_epochs=0.0, label_smoothing=0.0,
      crop_padding=4, flip=True, resized_crop=False,
      eval_every=5, eval_batch_size=500,
  ))
  return c
