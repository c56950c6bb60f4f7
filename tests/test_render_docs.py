"""docs/benchmarks.md is rendered from bench/results/*.json and must be up to date with them."""

import glob
import json
import os

from bench import render_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmarks_doc_is_up_to_date(tmp_path):
  fresh = tmp_path / "benchmarks.md"
  assert render_docs.main(["--out", str(fresh)]) == 0
  with open(render_docs.DOCS_PATH) as f:
    committed = f.read()
  assert committed == fresh.read_text(), (
      "docs/benchmarks.md is out of date with bench/results/*.json: run "
      "`python -m bench.render_docs` and commit the result.")


def test_check_flag_detects_a_stale_doc(tmp_path):
  stale = tmp_path / "benchmarks.md"
  stale.write_text("# Benchmarks\n")
  assert render_docs.main(["--out", str(stale), "--check"]) == 1
  stale.write_text(render_docs.render())
  assert render_docs.main(["--out", str(stale), "--check"]) == 0


def test_every_results_file_names_what_reproduces_it():
  paths = sorted(glob.glob(os.path.join(render_docs.RESULTS_DIR, "*.json")))
  assert paths
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    name = os.path.basename(path)
    assert data.get("script") and data.get("command"), f"{name} names no script and command"
    assert os.path.exists(os.path.join(ROOT, data["script"])), f"{name}: {data['script']}"
    assert "machine" in data, f"{name} records no machine"


def test_render_handles_every_shape(tmp_path):
  (tmp_path / "x.json").write_text(json.dumps({
      "benchmark": "shapes", "script": "bench/x.py", "command": "python -m bench.x",
      "note": "n" * 150, "count": 3, "ratio": 0.123456, "big": 12345.6, "flag": True,
      "values": [1.5, 2.0], "summary": {"a": 1, "nested": {"b": 2.5}},
      "config": {f"k{i}": i for i in range(render_docs.MAX_LEAVES + 1)},
      "rows": [{"name": "p", "s": 1, "t": {"u": 0.5}, "sub": [{"e": 1}, {"e": 2}]},
               {"name": "q", "s": 1, "t": {"u": 0.7}, "sub": [{"e": 3}]}],
      "machine": {"backend": "cpu", "empty": ""}, "markdown": "| not | repeated |"}))
  text = render_docs.render(str(tmp_path))
  assert "## x" in text and "`python -m bench.x`" in text
  assert "*note:* " + "n" * 150 in text
  assert "| ratio | 0.1235 |" in text and "| big | 12,346 |" in text
  assert "| nested.b | 2.50 |" in text
  assert "<details><summary>config</summary>" in text
  assert "| name | t.u | sub |" not in text  # nested records get their own tables
  assert "| name | t.u |" in text and "Same in every row: s 1." in text
  assert "**rows > sub (p)**" in text and "**rows > sub (q)**" in text
  assert "not | repeated" not in text
  assert "empty" not in text
