"""Imports a pretrained PyTorch ResNet (torchvision format) as a wmdd_jax teacher checkpoint.

    # torchvision's ImageNet-1K ResNet-18 (class names: "0".."999" unless given)
    python experiments/import_teacher.py --weights resnet18-f37072fd.pth --arch resnet18 \\
        --stem imagenet --dataset tfds:imagenet2012 --out runs/in1k/teacher
    # the same with the wnids, from a text file (one name per line, in label order) or a dataset
    python experiments/import_teacher.py ... --class-names-from imagenet_wnids.txt
    python experiments/import_teacher.py ... --class-names-from tfds:imagenet2012
    # the official WMDD Tiny-ImageNet teacher (224 px input, 3x3/2 stem, padding 3)
    python experiments/import_teacher.py --weights model_49.pth --arch resnet18 \\
        --stem tiny_official --dataset folder:data/tiny-imagenet-200 --image-size 224 \\
        --out runs/tiny/teacher --class-names-from folder:data/tiny-imagenet-200

Reads ``.pth``/``.pt`` (needs torch; loaded with ``weights_only=True``; a ``{"model": sd}``
checkpoint is unwrapped) or ``.safetensors`` (no torch needed), maps the weights onto
``get_model(arch, C, stem=stem)`` (:func:`wmdd_jax.convert.torchvision_to_flax`; C is read from
``fc.weight``) and writes a teacher checkpoint with a complete meta
(:func:`wmdd_jax.checkpoint.teacher_meta`). The dataset is not opened unless
``--class-names-from`` names a dataset spec. Mean/std default to ImageNet's, which torchvision's
weights and the official WMDD teachers expect.

Point a run at it with ``--config.teacher.checkpoint=DIR`` (with the same
``teacher.model``/``model_options``), or load it with ``wmdd_jax.checkpoint.build_teacher(DIR)``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from wmdd_jax import checkpoint, convert
from wmdd_jax.data import NORMALIZATION, open_dataset
from wmdd_jax.errors import ConfigError, WMDDError
from wmdd_jax.models.resnet import RESNET_LAYOUTS, STEMS

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--weights", required=True,
                 help="a .pth/.pt (torch) or .safetensors file holding a torchvision-format "
                      "ResNet state dict (or {'model': state_dict})")
  p.add_argument("--arch", default="resnet18", choices=tuple(RESNET_LAYOUTS))
  p.add_argument("--stem", default="imagenet", choices=STEMS,
                 help="the stem the weights were trained with (default: imagenet)")
  p.add_argument("--dataset", required=True,
                 help="data spec the teacher is for, as in configs (e.g. tfds:imagenet2012); "
                      "recorded in the meta, not opened")
  p.add_argument("--out", required=True, help="the teacher checkpoint directory to write")
  p.add_argument("--num-classes", type=int, default=None,
                 help="classifier width (default: read from fc.weight)")
  p.add_argument("--mean", type=float, nargs="+", default=list(IMAGENET_MEAN),
                 help="per-channel input mean, pixel scale [0, 1] (default: ImageNet's)")
  p.add_argument("--std", type=float, nargs="+", default=list(IMAGENET_STD),
                 help="per-channel input std (default: ImageNet's)")
  p.add_argument("--image-size", type=int, default=224,
                 help="side of the (square) input the teacher expects (default: 224)")
  p.add_argument("--class-names-from", default=None,
                 help="a text file (one class name per line, in label order) or a dataset spec "
                      "whose class_names to use (default: '0', '1', ...)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


def _class_names(source: str | None, num_classes: int) -> list[str]:
  if source is None:
    return [str(i) for i in range(num_classes)]
  if os.path.isfile(source):
    with open(source) as f:
      names = [line.strip() for line in f if line.strip()]
  else:
    print(f"reading class names from dataset {source}")
    names = list(open_dataset(source).class_names)
  if len(names) != num_classes:
    raise ConfigError(f"--class-names-from {source} gives {len(names)} class names, but the "
                      f"weights have {num_classes} classes; give a matching list.")
  return names


def main(argv: list[str] | None = None) -> str:
  """Runs the import; returns the checkpoint path written."""
  args = _parser().parse_args(argv)
  print(f"reading {args.weights}")
  state = convert.load_state_dict(args.weights)
  print(f"read {len(state)} tensors; converting to {args.arch} (stem {args.stem!r})")
  variables = convert.torchvision_to_flax(state, arch=args.arch, stem=args.stem,
                                          num_classes=args.num_classes)
  num_classes = int(variables["params"]["fc"]["bias"].shape[0])
  channels = int(variables["params"]["conv1"]["kernel"].shape[2])
  meta = checkpoint.teacher_meta(
      model=args.arch, model_options={"stem": args.stem}, num_classes=num_classes,
      class_names=_class_names(args.class_names_from, num_classes),
      image_shape=(args.image_size, args.image_size, channels), mean=args.mean, std=args.std,
      dataset=args.dataset, source={"weights": os.path.abspath(args.weights),
                                    "format": "torchvision"})
  path = checkpoint.save_teacher(args.out, variables, meta, overwrite=args.overwrite)
  count = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
  print(f"teacher: {args.arch} (stem {args.stem!r}), {num_classes} classes, {count:,} parameters,"
        f" input {args.image_size}x{args.image_size}x{channels}; saved to {path}")
  return path


if __name__ == "__main__":
  try:
    main()
  except WMDDError as e:
    sys.exit(f"error: {e}")
