"""bench/official.py: its PyTorch transcription runs, and it says how to install torch when absent
(the timing itself is the benchmark's job, not a test's)."""

import argparse
import sys

import pytest

from bench import official


def test_missing_torch_fails_with_the_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
    official.main(["--rounds", "1"])


@pytest.mark.torch
def test_official_transcription_runs_at_tiny_shapes():
  torch = pytest.importorskip("torch")
  args = argparse.Namespace(classes=2, ipc=2, hw=8, stem="cifar", threads=1,
                            work="recover_iteration,student_step")
  programs, version = official._torch_worker(args)
  assert version == torch.__version__
  recover = programs[("recover_iteration", "official")]
  before = recover.inputs.detach().clone()
  recover()
  recover()
  assert recover.step == 2 and len(recover.bn_terms) == 20  # every BN layer of ResNet-18 hooked
  assert not torch.equal(before, recover.inputs.detach())
  # The clip keeps every channel inside the range that maps back to [0, 1] pixels.
  for c in range(3):
    lo, hi = -official.MEAN[c] / official.STD[c], (1 - official.MEAN[c]) / official.STD[c]
    channel = recover.inputs.detach()[:, c]
    assert channel.min() >= lo - 1e-6 and channel.max() <= hi + 1e-6
  student = programs[("student_step", "official")]
  weights = [p.detach().clone() for p in student.model.parameters()]
  student()
  assert any(not torch.equal(a, p.detach()) for a, p in zip(weights, student.model.parameters()))
