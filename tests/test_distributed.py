"""The execution layer on one device: every execution runs the three stage patterns to the same
numbers as a plain numpy reference (tests/test_parallel.py runs them on 4 simulated devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from wmdd_jax import ConfigError
from wmdd_jax.distributed import (
    Execution,
    ExecutionOptions,
    Sharded,
    Units,
    from_mesh,
    local_execution,
    make_execution,
)
from wmdd_jax.distributed.sharding import make_mesh


def _executions():
  return {"single": Execution(), "sharded": Sharded(make_mesh()), "units": Units(3)}


def test_options_are_checked():
  with pytest.raises(ConfigError, match="mesh"):
    ExecutionOptions(mesh="sometimes")
  with pytest.raises(ConfigError, match="units"):
    ExecutionOptions(units=-1)
  with pytest.raises(ConfigError, match="memory_budget_bytes"):
    ExecutionOptions(memory_budget_bytes=1.5)


def test_compiler_options_are_per_program_and_cpu_only():
  from wmdd_jax.distributed import execution as execution_lib

  with pytest.raises(ConfigError, match="compiler_options"):
    ExecutionOptions(compiler_options="fast")
  none = make_execution(ExecutionOptions(mesh="off", compiler_options="none"))
  auto = make_execution(ExecutionOptions(mesh="on", units=2))
  assert none.compiler == "none" and auto.compiler == "auto"
  assert none.compiler_options("recover_step") is None
  assert auto.compiler_options("recover_step") is None  # units: bit-identity first
  auto = make_execution(ExecutionOptions(mesh="off"))
  assert auto.compiler_options("") is None  # unnamed programs (the teacher) keep XLA's defaults
  expected = dict(execution_lib.CPU_PROGRAM_OPTIONS["recover_step"])
  if jax.default_backend() == "cpu":
    assert auto.compiler_options("recover_step") == expected
    assert auto.compiler_options("student_step") == expected
  else:
    assert auto.compiler_options("recover_step") is None
  # A name this jaxlib does not know is dropped, not an error.
  assert not execution_lib._accepted((("xla_cpu_no_such_option", ""),))
  # The options compile and give the same numbers as XLA's defaults.
  f = lambda x: jnp.sum(jnp.sin(x) * x)
  x = jnp.linspace(0.0, 1.0, 64)
  np.testing.assert_allclose(auto.jit(f, program="recover_step")(x), jax.jit(f)(x), rtol=1e-6)


def test_make_execution_follows_the_options():
  assert type(make_execution(ExecutionOptions(mesh="off"))) is Execution
  assert type(make_execution(ExecutionOptions(mesh="on"))) is Sharded
  units = make_execution(ExecutionOptions(mesh="on", units=2))
  assert type(units) is Units and units.units == 2 and len(units.devices) == jax.device_count()
  # One device and "auto": no mesh.
  assert type(make_execution(ExecutionOptions(), devices=jax.devices()[:1])) is Execution
  assert type(from_mesh(None, 0)) is Execution and type(from_mesh(make_mesh(), 0)) is Sharded
  assert type(local_execution()) is Sharded


@pytest.mark.parametrize("kind", ["single", "sharded", "units"])
def test_gradient_step_matches_numpy(kind):
  """Least squares on a batch of 7 rows: the shares' gradients add up to the batch gradient
  (7 rows in 3 units: shares of 3, 2 and 2)."""
  execution = _executions()[kind]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3)).astype(np.float32)
  y = rng.normal(size=(7,)).astype(np.float32)
  w0 = rng.normal(size=(3,)).astype(np.float32)

  def share(weights, shared, rows, key, batch):
    del shared, key
    xs, ys = rows
    loss_fn = lambda w: jnp.sum((xs @ w["w"] - ys) ** 2) / batch
    loss, grad = jax.value_and_grad(loss_fn)(weights)
    return {"grads": grad, "loss": loss}

  def apply(state, total):
    return state.apply_gradients(grads=total["grads"]), total["loss"]

  state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.asarray(w0)},
                                        tx=optax.sgd(0.1))
  step = execution.gradient_step(share, apply, weights_of=lambda s: s.params)
  state = execution.place(state, copy=True)
  state, loss = step(state, (), execution.put_batch((x, y)), execution.place(jax.random.key(0)),
                     np.int32(0))
  grad = 2 * x.T @ (x @ w0 - y) / 7
  np.testing.assert_allclose(float(loss), np.mean((x @ w0 - y) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.params["w"]), w0 - 0.1 * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["single", "sharded", "units"])
def test_row_and_sum_passes_match_numpy(kind):
  execution = _executions()[kind]
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  scale = execution.place(jnp.float32(2.0))
  rows = execution.row_pass(lambda s, a: (a * s, jnp.sum(a, axis=1)), 1, (True, False))
  doubled, sums = rows(scale, *execution.put_rows((x,)))
  np.testing.assert_array_equal(np.asarray(doubled), x * 2)
  np.testing.assert_array_equal(execution.rows_to_host(sums), x.sum(1))
  total = execution.sum_pass(lambda s, a: {"sum": jnp.sum(a) * s}, 1)
  np.testing.assert_allclose(float(total(scale, *execution.put_batch((x,)))["sum"]),
                             2 * x.sum())


@pytest.mark.parametrize("kind", ["single", "sharded", "units"])
def test_map_classes_covers_every_class_once(kind):
  execution = _executions()[kind]
  points = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
  keys = jax.random.split(jax.random.key(1), 5)
  calls = []

  @jax.jit
  def solve(p, k):
    return {"mean": jnp.mean(p, axis=1), "draw": jax.vmap(jax.random.uniform)(k)}

  def solve_one(p, k):
    calls.append(1)
    return {"mean": jnp.mean(p), "draw": jax.random.uniform(k)}

  out = execution.map_classes(solve, (points, keys), chunk=2,
                              solve_one=functools.partial(solve_one))
  np.testing.assert_allclose(np.asarray(out["mean"]), points.mean(1))
  np.testing.assert_array_equal(np.asarray(out["draw"]),
                                np.asarray(jax.vmap(jax.random.uniform)(keys)))
  # Chunks of 2 leave one class alone, which runs the unbatched program (not on a mesh, which
  # solves all classes at once).
  assert len(calls) == (0 if kind == "sharded" else 1)


def test_units_shrink_independent_chunks():
  assert Units(4).class_chunk(100, 10) == 3
  assert Execution().class_chunk(100, 10) == 100
  assert Sharded(make_mesh()).class_multiple == jax.device_count()
