"""Fashion-MNIST (10 classes, 60k train / 10k test, 28x28 grey).

    python experiments/pretrain.py --config experiments/configs/fashion_mnist.py \\
        --workdir runs/fashion_mnist
    python experiments/distill.py --config experiments/configs/fashion_mnist.py \\
        --workdir runs/fashion_mnist
Debug variant: add ``--config.debug=True`` (2 epochs of 20 steps).

The default spec reads the IDX files next to the repository (``../shared/datasets/fashion-mnist``
seen from its root); elsewhere use ``--config.dataset.spec=tfds:fashion_mnist`` or
``idx:<dir>``.

Teacher: ConvNet-D3 (width 128), 20 epochs, batch 128, SGD lr 0.1 cosine, pad-2 crop + flip.
Expected ~93% test top-1 (the DD literature reports 93.5% for this network trained longer;
bench/teacher.py reaches ~92% in 5 epochs without augmentation). Runtime: ~1 h on 2 CPU cores
(about 3 min per epoch), well under a minute on one GPU.

Distillation defaults (issue 14's validation screen, bench/results/study_fashion_mnist.json:
10% of train held out, seed 0, 3-epoch teacher, 500 recover iterations, 200 student epochs):
every recover method starts from real images (``recover.init="real"``) and WMDD's CE weight is
10 (``method_switches``; 3 for ``wmdd:per_class``, carried over from cifar10_dev.py, not
screened here); the baselines keep the official switches. Why: at IPC 1 WMDD from noise at r_ce
1 scored 64.5 val, from real 68.2, from real at r_ce 10 69.5 (random real 66.9, SRe2L 71.0); at
IPC 10 the four init x r_ce points were 78.75-78.85 (random real 77.8, SRe2L from real 77.0),
so the IPC-1 choice costs nothing there. Expected (test split, 3 seeds, 3-epoch teacher at
88.2%, the reduced settings above; 1-4 min per run on 2 CPU cores at IPC 1 / 10, 6-16 at 50;
bench/results/accuracy_fashion_mnist.json): WMDD 72.6 / 80.2 at IPC 1 / 10 (random real 64.7 /
76.6, SRe2L 72.3 / 77.8); IPC 50, 3 seeds: WMDD 85.9 (per_class objective 86.0), SRe2L 84.9,
CE+PCBN 85.4, Wass+BN 85.1, random real 85.8 (+0.1 paired, per_class +0.2: issue 14's 1-point
margin is not met there; on validation, seed 0, a lower recover lr of 0.05 did not help: 85.4 vs
85.3 at 0.25, random real 85.9; nor did the student's crops (0.5, 1) or temperature 4, which
lifted random real images more than WMDD: 86.2 / 86.0 against 85.4 / 85.3, defaults 85.75 / 85.3,
so eval keeps the official crops and T 20).
``:noise`` is the earlier default (from noise, official switches; its grid is
bench/results/accuracy_fashion_mnist_noise.json: WMDD 67.0 at IPC 1, 79.0 at IPC 10).
``:real`` is kept as a name for the default (result files of the screen's finalist cite it).
The earlier default at full settings on one H200 (20-epoch teacher at 92.9%, seed 0,
bench/results/fashion_mnist_gpu.json): wmdd 59.8 / 79.8 / 85.4 at IPC 1 / 10 / 50 (sre2l 46.1 /
69.8 / 83.7, random real 65.7 / 76.9 / 87.0).
Features stay the flattened last map: ``:pooled`` (cifar10_dev.py's choice) did not move IPC 10
on validation (78.8 vs 79.0 mean of 2 seeds).
"""

from wmdd_jax.config import default_config


def get_config(variant: str = ""):
  """``variant``: "" / "real" / "flat" (the defaults above: ConvNet-D3 whose features are the
  flattened last map, from real images, WMDD's CE weight 10), "noise" (from noise, official
  switches: the earlier default) or "pooled" (the defaults with the network's spatial-mean
  features, as cifar10_dev.py), e.g. ``--config experiments/configs/fashion_mnist.py:noise``.
  """
  if variant not in ("", "flat", "pooled", "real", "noise"):
    raise ValueError(f"fashion_mnist.py: unknown variant {variant!r}; use '', 'flat', "
                     "'pooled', 'real' or 'noise'.")
  c = default_config()
  c.dataset.spec = "idx:../shared/datasets/fashion-mnist"
  # Teacher: the default ConvNet-D3 recipe (batch 128, SGD lr 0.1 cosine, flip), 20 epochs,
  # pad-2 crops.
  c.teacher.epochs = 20
  c.teacher.crop_padding = 2
  # Recover, evaluation: docs/method.md defaults (2000 steps, Adam 0.25, crops 0.08-1, 300 student
  # epochs) except r_bn, carried over from digits (3 BN layers, not ResNet-18's 20), and the
  # screened init and CE weight below.
  c.recover.r_bn = 1.0
  if variant == "pooled":
    c.teacher.model_options = {"features": "pooled"}
  if variant != "noise":
    # Validation screen, seed 0: IPC 1, from real +3.7 over noise at r_ce 1, r_ce 10 +1.4
    # more; IPC 10, all four points within 0.1.
    c.recover.init = "real"
    c.method_switches = {"wmdd": {"r_ce": 10.0}, "wmdd:per_class": {"r_ce": 3.0}}
  return c
