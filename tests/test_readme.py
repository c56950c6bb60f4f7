"""The README's "Use it from your code" blocks run as they are (in order, one namespace)."""

import os
import re

import numpy as np
import pytest

from wmdd_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Use it from your code"


def readme_blocks(text: str) -> list[str]:
  """The ```python blocks between SECTION and the next level-2 heading."""
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  section = text[start:end if end >= 0 else None]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow  # compiling a barycenter solver and a student: ~30 s on 2 idle CPU cores
def test_use_it_from_your_code_runs(tmp_path, monkeypatch, capsys):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = readme_blocks(f.read())
  assert len(blocks) >= 4
  # The Orbax block reads demo_out/wmdd/synset (what `make demo` writes): a small stand-in.
  c, k = 3, 2
  images = np.random.default_rng(0).normal(size=(c, k, 8, 8, 1)).astype(np.float32)
  synset = checkpoint.SyntheticSet(images, np.repeat(np.arange(c), k).reshape(c, k),
                                   np.full((c, k), 1 / k, np.float32), ["a", "b", "c"], [0.3],
                                   [0.4], {"method": "wmdd"})
  monkeypatch.chdir(tmp_path)
  checkpoint.save_synthetic_set(tmp_path / "demo_out" / "wmdd" / "synset", synset)
  namespace: dict = {"__name__": "readme"}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
  printed = capsys.readouterr().out
  assert "(2, 10) (2, 32) [(2, 16), (2, 32)]" in printed
  assert "recover loss" in printed and "student test top-1" in printed
  np.testing.assert_allclose(namespace["pixels"], np.clip(images * 0.4 + 0.3, 0, 1), atol=1e-6)
  assert np.isfinite(np.asarray(namespace["synthetic"])).all()
  # The contract written directly works as the registered models do.
  from wmdd_jax.models import apply_model, init_model

  native = namespace["Native"]()
  out = apply_model(native, init_model(native, namespace["jax"].random.key(0), (8, 8, 3)),
                    np.zeros((2, 8, 8, 3), np.float32))
  assert out.logits.shape == (2, 10) and [m.shape for m in out.bn_mean] == [(2, 16)]
