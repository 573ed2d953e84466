"""Data parallelism: one mesh axis over all devices, batches sharded along image pairs.

The training state is replicated; each batch array is one global ``jax.Array`` whose leading
pair axis is split over the "data" axis, so a user/shop pair never straddles two devices. The
train step is an ordinary ``jax.jit`` with these shardings (no pmap): the model computes its
losses as means over the whole (global) batch arrays, XLA inserts the cross-device reductions,
and the loss and gradients are those of the global batch, identical to a one-device run up to
float summation order.

Random sampling (anchors and RoIs per image) uses keys split from the step key inside the
program. With ``jax_threefry_partitionable`` (the default since jax 0.5, and set again here)
the bits drawn do not depend on how the arrays are sharded, so 1 and N devices sample the
same anchors and RoIs.

Multi-host: every process calls ``initialize_distributed`` first, reads its own slice of the
global batch (``global_batch_pairs / jax.process_count()`` pairs) and turns it into global
arrays with ``host_local_to_global``. Host-side work runs on process 0 while the others wait
(``on_process_zero``), and what each process computed on its share reaches process 0 through
a folder they share (``gather_on_process_zero``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from df2_jax import files

DATA_AXIS = "data"
log = logging.getLogger(__name__)


def _ensure_partitionable_random() -> None:
  """Random bits independent of sharding (the default from jax 0.5 on; enforced here)."""
  try:
    if not jax.config.jax_threefry_partitionable:
      jax.config.update("jax_threefry_partitionable", True)
  except AttributeError:
    pass  # The option is gone once partitionable bits are the only behaviour.


_ensure_partitionable_random()


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           timeout_s: int = 300) -> bool:
  """Joins a multi-process run; a no-op for a single process.

  ``jax.distributed.initialize`` is called when any argument is given or when the environment
  announces a cluster that jax detects by itself (SLURM: ``SLURM_JOB_ID`` with more than one
  task; Open MPI: ``OMPI_COMM_WORLD_SIZE``; a multi-host Cloud TPU slice: ``TPU_WORKER_HOSTNAMES``
  / ``MEGASCALE_COORDINATOR_ADDRESS``; or ``JAX_COORDINATOR_ADDRESS``). Called without
  arguments in such an environment, jax reads the coordinator, process count and id from it.
  Must run before any other jax call that touches devices.

  CPU devices of different processes talk through gloo (set here; it does not affect GPUs or
  TPUs). A process other than 0 first waits up to ``timeout_s`` for the coordinator's port to
  accept a connection and raises ``ConnectionError`` naming it if it does not (jax itself would
  abort the process with a gRPC deadline message); every process gives jax the same timeout for
  all processes to join.

  Returns:
    True if ``jax.distributed.initialize`` was called.

  Raises:
    ValueError: an incomplete or inconsistent set of arguments.
    ConnectionError: the coordinator was not reachable within ``timeout_s``.
  """
  configured = any(v is not None for v in (coordinator_address, num_processes, process_id))
  env = _cluster_environment()
  if not configured and not env:
    return False
  if configured:
    missing = [name for name, v in (("coordinator_address", coordinator_address),
                                    ("num_processes", num_processes),
                                    ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"Joining a cluster by hand needs --coordinator_address, "
                       f"--num_processes and --process_id together; missing: "
                       f"{', '.join('--' + m for m in missing)}.")
    if not 0 <= int(process_id) < int(num_processes):
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) "
                       f"(--num_processes={num_processes}).")
    if int(process_id) != 0:
      wait_for_coordinator(coordinator_address, timeout_s, int(process_id))
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass  # a jax without the option: CPU collectives across processes are not available
  log.info("Joining the cluster%s (up to %d s for every process to join).",
           f" at {coordinator_address} as process {process_id} of {num_processes}"
           if configured else " described by the environment", timeout_s)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=int(timeout_s))
  log.info("Process %d of %d: %d local devices, %d in all.", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  configure_logging()
  return True


class _ProcessPrefix(logging.Filter):
  """Prefixes warnings and errors with "[process i]" (once, whatever the handlers)."""

  def __init__(self, index: int):
    super().__init__()
    self.prefix = f"[process {index}] "

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING and not getattr(record, "_process_prefixed", False):
      record.msg = self.prefix + str(record.msg)
      record._process_prefixed = True
    return True


def configure_logging() -> None:
  """In a run of several processes: process 0 logs as usual, the others only warnings and
  errors, and every process's warnings and errors start with "[process i]". A no-op for one
  process. ``initialize_distributed`` calls it; call it again if the root logger's handlers
  are replaced afterwards (``logging.basicConfig(force=True)``)."""
  if jax.process_count() == 1:
    return
  root = logging.getLogger()
  if jax.process_index() != 0 and root.getEffectiveLevel() < logging.WARNING:
    root.setLevel(logging.WARNING)
  for handler in root.handlers:
    if not any(isinstance(f, _ProcessPrefix) for f in handler.filters):
      handler.addFilter(_ProcessPrefix(jax.process_index()))


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Returns when every process has reached this barrier; a no-op for one process.

  The wait goes through jax's coordination service (not a device collective), so a long wait
  (process 0 scoring an evaluation while the others wait) holds no accelerator and has an
  explicit ``timeout_s``; a process that dies makes the others' wait fail instead of hang.
  Every process must call the same barriers in the same order (the names get a running
  number, which the coordination service needs to tell repeated barriers apart).
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  key = f"df2_jax_{name}_{next(_BARRIERS)}"
  multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))


def on_process_zero(fn: Callable[[], Any], name: str, timeout_s: float = 3600.0) -> Any:
  """``fn()`` on process 0 while the other processes wait for it (``barrier(name)``): e.g. a
  dataset generated once into a folder every process reads. Returns ``fn``'s result on process
  0, None on the others."""
  result = fn() if jax.process_index() == 0 else None
  barrier(name, timeout_s=timeout_s)
  return result


def gather_on_process_zero(arrays: Mapping[str, np.ndarray], folder: str, name: str,
                           timeout_s: float = 3600.0) -> list[dict[str, np.ndarray]] | None:
  """Every process's ``arrays`` (numbers only), in process order, on process 0; None on the
  others. With one process: ``[arrays]``.

  Each process writes ``folder/<name>-SSSSS.npz`` (atomically; ``folder`` is one every process
  sees, e.g. the run's staging folder), all wait at a barrier, and process 0 reads the files
  (``allow_pickle=False``: whatever lies in the shared folder, reading it cannot run code) and
  removes them. Every process must call this together.
  """
  for key, value in arrays.items():
    if np.asarray(value).dtype.kind not in "biuf":
      raise TypeError(f"{name}: array {key!r} has dtype {np.asarray(value).dtype}, expected "
                      f"numbers")
  if jax.process_count() == 1:
    return [dict(arrays)]
  path = lambda i: os.path.join(folder, f"{name}-{i:05d}.npz")
  files.save_npz(path(jax.process_index()), compressed=False, **arrays)
  barrier(f"gather_{name}", timeout_s=timeout_s)
  if jax.process_index() != 0:
    return None
  parts = []
  for i in range(jax.process_count()):
    with np.load(path(i), allow_pickle=False) as z:
      part = {k: z[k] for k in z.files}
    os.remove(path(i))
    for key, value in part.items():
      if value.dtype.kind not in "biuf":
        raise ValueError(f"{path(i)}: {key!r} has dtype {value.dtype}, expected numbers")
    parts.append(part)
  return parts


def wait_for_coordinator(address: str, timeout_s: float, process_id: int = -1) -> None:
  """Returns once ``address`` ("host:port") accepts a TCP connection; raises
  ``ConnectionError`` after ``timeout_s`` seconds."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address must be host:port, got {address!r}")
  deadline = time.monotonic() + float(timeout_s)
  last_error: OSError | None = None
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      raise ConnectionError(
          f"Process {process_id} could not reach the coordinator at {address} within "
          f"{timeout_s:g} s ({last_error}). Start process 0 (which hosts it) with the same "
          f"--coordinator_address, check the host name and port, and that the port is open "
          f"between the machines; --distributed_timeout_s sets the wait.")
    time.sleep(0.5)


def _cluster_environment() -> bool:
  """Whether the environment describes a multi-process job that jax can auto-detect."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over all devices, or the first ``num_devices`` of them.

  A subset is only possible in a single-process run (every process must own mesh devices).
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
  if n != len(devices) and jax.process_count() > 1:
    raise ValueError(f"num_devices={n} must be all {len(devices)} devices when running "
                     f"{jax.process_count()} processes")
  chosen = devices[:n]
  if hasattr(jax, "make_mesh"):
    kwargs = {}
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
      kwargs["axis_types"] = (axis_type.Auto,)  # shardings propagate as with plain jit.
    return jax.make_mesh((n,), (DATA_AXIS,), devices=chosen, **kwargs)
  return Mesh(np.asarray(chosen), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (pair) axis split along "data", every other axis whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def num_data_shards(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_batch_divisible(global_batch_pairs: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch (in image pairs) splits evenly over the devices
  and over the processes (each process loads its own slice)."""
  n, processes = num_data_shards(mesh), jax.process_count()
  multiple = math.lcm(n, processes)
  if global_batch_pairs <= 0 or global_batch_pairs % multiple:
    lower = (global_batch_pairs // multiple) * multiple
    suggestion = f"{lower} or {lower + multiple}" if lower > 0 else f"{multiple}"
    where = f"{n} devices" + (f" in {processes} processes" if processes > 1 else "")
    raise ValueError(
        f"The global batch of {global_batch_pairs} image pairs cannot be split evenly over "
        f"{where} (the mesh's '{DATA_AXIS}' axis): pairs are never split, so the batch "
        f"must be a multiple of {multiple} pairs, e.g. {suggestion} "
        f"(config.train.global_batch_pairs).")


def local_batch_pairs(global_batch_pairs: int, mesh: Mesh) -> int:
  """Pairs this process loads per step (its slice of the global batch)."""
  check_batch_divisible(global_batch_pairs, mesh)
  return global_batch_pairs // jax.process_count()


_NARROW = {"i": np.int32, "u": np.uint32, "f": np.float32, "c": np.complex64}


def _canonical(x: Any) -> np.ndarray:
  """A numpy array with the dtype jax will use (int64 -> int32 unless x64 is enabled)."""
  x = np.asarray(x)
  if x.dtype.kind not in "biufc":
    raise TypeError(f"batch arrays must be numeric or bool, got dtype {x.dtype}")
  if x.dtype.itemsize > np.dtype(_NARROW.get(x.dtype.kind, x.dtype)).itemsize and not (
      jax.config.jax_enable_x64):
    return x.astype(_NARROW[x.dtype.kind])
  return x


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded along the leading axis.

  Args:
    batch: numpy arrays whose leading axis is this host's consecutive slice of the global
      batch (in a single-process run, the whole batch). Every array has the same leading size.
    mesh: the data mesh.

  Returns:
    The same keys as global ``jax.Array``s of leading size ``local * process_count``.
  """
  sharding = batch_sharding(mesh)
  leads = {k: np.shape(v)[0] for k, v in batch.items()}
  if len(set(leads.values())) > 1:
    raise ValueError(f"batch arrays disagree on the leading (pair) axis: {leads}")
  if leads:
    global_pairs = next(iter(leads.values())) * jax.process_count()
    check_batch_divisible(global_pairs, mesh)
  return {k: jax.make_array_from_process_local_data(sharding, _canonical(v))
          for k, v in batch.items()}


def _replicate_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    data = _replicate_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=impl)
  if jax.process_count() == 1:
    # Always onto the mesh's own sharding, committed, even for an equivalent one (a one-device
    # mesh and an uncommitted array): the train step's outputs carry this sharding, and an
    # input that differs only there made jit trace and compile the step a second time.
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x  # already a copy on every device of the mesh
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf copied to all devices of the mesh (the same value on every process)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: _replicate_leaf(x, sharding), tree)


def one_replica(tree: Any) -> Any:
  """Each fully replicated ``jax.Array`` leaf as this process's first copy (a one-device
  array), other leaves unchanged: what a single-device program (evaluation) takes, also in a
  multi-process run, where the global array is not fully addressable."""
  def first(x):
    if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
      return x.addressable_data(0)
    return x
  return jax.tree_util.tree_map(first, tree)


def shard_train_step(build_step: Callable[..., Callable[..., Any]], mesh: Mesh, *args,
                     **kwargs) -> Callable[..., Any]:
  """A train step jitted for data parallelism on ``mesh``.

  ``build_step(*args, in_shardings=..., out_shardings=..., **kwargs)`` must return the jitted
  ``step(state, batch, key) -> (state, metrics)`` with the state donated, as
  ``train_step.make_train_step(model, tx, loss_weights, **jit_kwargs)`` does::

    step = shard_train_step(train_step.make_train_step, mesh, model, tx, loss_weights)

  The state and key are replicated, every batch array is split along its leading pair axis,
  and the new state and the (scalar) metrics come back replicated. The losses are means over
  the global batch arrays, so they and the gradients are those of the global batch.
  """
  rep, data = replicated(mesh), batch_sharding(mesh)
  return build_step(*args, in_shardings=(rep, data, rep), out_shardings=(rep, rep), **kwargs)


def per_device(fn: Callable[..., Any], mesh: Mesh, num_batch_args: int) -> Callable[..., Any]:
  """``fn(variables, *batch_args)`` run by every device of ``mesh`` on its own rows, jitted.

  The variables are replicated and each of the ``num_batch_args`` batch arrays is split along
  its leading axis (``shard_map``): a device computes exactly what a one-device run of ``fn``
  computes on its rows, with no communication, and the outputs (a pytree of arrays with the
  leading batch axis) are split the same way. Evaluation and prediction use it: one program
  over every device of every process, fed by ``host_local_to_global`` and read back with
  ``host_local``.
  """
  rep, data = PartitionSpec(), PartitionSpec(DATA_AXIS)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(rep,) + (data,) * num_batch_args,
                               out_specs=data, check_vma=False))


def host_local(tree: Any, mesh: Mesh) -> Any:
  """This process's rows of arrays split along the leading axis, as numpy arrays (the inverse
  of ``host_local_to_global``; in a one-process run, the whole arrays)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tree = multihost_utils.global_array_to_host_local_array(tree, mesh,
                                                            PartitionSpec(DATA_AXIS))
  return jax.device_get(tree)


def global_batch_shapes(batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  """The shapes ``host_local_to_global`` will produce from this process's batch."""
  n = jax.process_count()
  return {k: (np.shape(v)[0] * n,) + tuple(np.shape(v)[1:]) for k, v in batch.items()}


__all__ = ["DATA_AXIS", "barrier", "batch_sharding", "check_batch_divisible",
           "configure_logging", "global_batch_shapes", "host_local", "host_local_to_global",
           "initialize_distributed", "local_batch_pairs", "make_mesh", "num_data_shards",
           "one_replica", "per_device", "replicate", "replicated", "shard_train_step"]
