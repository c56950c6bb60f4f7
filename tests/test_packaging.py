"""`pip install -e .` alone runs the library and `make demo`: every third-party module that
wmdd_jax and the experiment scripts import is in setup.cfg's install_requires (or an extra the
code names when it is missing); the license the metadata names is in the repository."""

import ast
import configparser
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported only on paths that say what to install (an extra): not needed by the demo.
OPTIONAL = {"torch", "safetensors", "tensorflow", "ot", "torchvision"}


def _requirement_names(text: str) -> set[str]:
  names = set()
  for line in text.splitlines():
    line = line.split("#")[0].strip()
    if line:
      names.add(re.split(r"[\[<>=!~; ]", line)[0].lower().replace("_", "-"))
  return names


def _imports(paths):
  found = set()
  for path in paths:
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        found.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  return found


def test_install_requires_cover_the_library_and_the_demo():
  config = configparser.ConfigParser()
  config.read(os.path.join(ROOT, "setup.cfg"))
  required = _requirement_names(config["options"]["install_requires"])
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "wmdd_jax"))
           for f in fs if f.endswith(".py")]
  files += [os.path.join(ROOT, "experiments", f) for f in ("demo.py", "distill.py",
                                                           "evaluate.py", "pretrain.py")]
  third_party = {m for m in _imports(files)
                 if m not in sys.stdlib_module_names and m not in ("wmdd_jax", "__future__")}
  dists = importlib.metadata.packages_distributions()
  missing = []
  for module in sorted(third_party - OPTIONAL):
    names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
    if not names & required:
      missing.append(f"{module} (from {sorted(names)})")
  assert not missing, f"imported but not in install_requires: {missing}"
  extras = config["options.extras_require"]
  assert "jax[cuda12]" in extras["cuda"] and "jax[tpu]" in extras["tpu"]


def test_the_license_is_in_the_repository():
  config = configparser.ConfigParser()
  config.read(os.path.join(ROOT, "setup.cfg"))
  assert config["metadata"]["license"] == "Apache-2.0"
  with open(os.path.join(ROOT, config["metadata"]["license_files"].strip())) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
