"""Test-only shim that lets Pallas' Mosaic GPU interpreter run FA3-style kernels.

JAX 0.11 ships a CPU interpreter for Mosaic GPU kernels
(`plgpu.InterpretGPUParams`). Stock 0.11.2 refuses a real FlashAttention-3
kernel in five places and, on two or more devices at once (jax.pmap,
jax.shard_map), mixes up the devices' state in two more; each is patched
below as a separate, small piece that names the upstream gap. Delete each
piece when upstream JAX handles it.

  1. `pl.run_state` (e.g. `pl.run_state(f)(plgpu.ACC.init(acc))`) falls
     through to `run_state_p.bind`, which cannot lower the kernel effects.
  2. `plgpu.wgmma(acc, a, b)` with `a` a register array (P @ V, dS @ K): the
     interpreter treats every operand as an allocation key.
  3. `plgpu.copy_smem_to_gmem(..., predicate=p)` (emitted by `emit_pipeline`
     for outputs) raises "predicate not supported".
  4. Barrier teardown requires every waiting thread to have observed every
     completed phase; a producer/consumer ring whose last phases nobody waits
     on (harmless on hardware) is rejected.
  5. The end-of-kernel check that no mbarrier is left reads every device's
     memory while another device may still be running.
  6. A device that finishes a cluster restarts every device's register
     buffer ids, so a live accumulator's key is handed out again.
  7. `plgpu.copy_smem_to_gmem(..., reduction_op="add")` (TMA reduce-add)
     raises "reduction_op not supported".

Usage (all patches are process-global while the context is open; run and
trace the kernel inside it, since jit caches keep the interpreted program):

  with mosaic_interpreter():             # patches + forces interpret mode
    out = my_mosaic_kernel(q, k, v)      # plgpu.kernel / pl.pallas_call
  # or pass `interpret=PARAMS` explicitly, with `mosaic_interpreter(force=False)`.

The module imports on any JAX; `SUPPORTED` / `REASON` tell tests to skip.
"""

import collections
import contextlib
import threading

import jax

REASON = (
    "the Mosaic GPU interpreter needs JAX >= 0.11; CI's second pass runs this"
    " on Python 3.12 / JAX 0.11.2"
)

try:
  if tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11):
    raise ImportError(jax.__version__)
  import numpy as np
  from jax._src import core as jax_core
  from jax._src import linear_util
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret, shared_memory
  from jax._src.state import discharge as state_discharge
  from jax._src.state import types as state_types
  from jax.experimental.pallas import mosaic_gpu as plgpu
  SUPPORTED = True
  _ONE_EQN_DEBUG_INFO = linear_util.DebugInfo(
      "mosaic_interpret shim", "<one eqn of a kernel jaxpr>", None, None)
except ImportError:
  SUPPORTED = False

# Race detection stays off (the default): with it on, 0.11.2 reports a race on
# attention_mgpu's backward dK/dV kernel, between the TMA refill of the
# lse/delta ring and a read that precedes its consumed-barrier arrival (a false
# positive on a correctly synchronised double buffer). NaN-filled fresh
# memory and raising out-of-bounds reads keep uninitialised reads visible.
PARAMS = (
    plgpu.InterpretGPUParams(
        detect_races=False, uninitialized_memory="nan",
        out_of_bounds_reads="raise")
    if SUPPORTED else None)


# -- helpers: per-thread register (REGS) buffers ------------------------------

def _alloc_regs(interp, token, value, source_info):
  """Allocates a REGS buffer of this warpgroup holding `value`; returns its key."""
  token, request = gpu_callbacks.call_make_allocation_request_array(
      token=token, compute_unit=interp.thread,
      memory_space_id=shared_memory.get_memory_space_idx(
          gpu_core.MemorySpace.REGS),
      initial_ref_count=1)
  return gpu_callbacks.call_allocate_buffer(
      token=token, mesh_location=interp.mesh_location, thread=interp.thread,
      allocation_request_as_array=request, value=value,
      source_info=source_info)


def _free(interp, token, key, source_info):
  return gpu_callbacks.call_deallocate_buffer(
      token=token, mesh_location=interp.mesh_location, thread=interp.thread,
      allocation_key_as_array=key, source_info=source_info)


# -- 1. run_state --------------------------------------------------------------
# Upstream gap: JaxprInterpreter.interpret has no `run_state_p` case (see its
# "TODO(jburnim): Handle run_state_p"). We give every initialised non-Ref
# operand (accumulators, hoisted consts) a REGS buffer, interpret the body with
# the token threaded through, then read the buffers back as the results; Ref
# operands pass through. wgmma runs synchronously in the interpreter, so the
# implicit "await all WGMMAs" of run_state needs nothing more.
# Delete when upstream JAX handles it.

def _interpret_run_state(interp, eqn, token, invals):
  if not all(eqn.params["is_initialized"]):
    raise NotImplementedError("run_state with uninitialised Refs")
  keys, owned = [], []
  for var, val in zip(eqn.invars, invals):
    is_ref = isinstance(var.aval, state_types.AbstractRef)
    if not is_ref:
      token, val = _alloc_regs(interp, token, val, eqn.source_info)
    keys.append(val)
    owned.append(not is_ref)
  token, _ = interp.interpret(eqn.params["jaxpr"], token, *keys)
  outs = []
  for var, key, is_owned in zip(eqn.outvars, keys, owned):
    if is_owned:
      token, val = gpu_callbacks.call_get(
          token=token, result_shape_and_dtype=var.aval,
          mesh_location=interp.mesh_location, thread=interp.thread,
          allocation_key_as_array=key, transforms=(),
          source_info=eqn.source_info)
      token = _free(interp, token, key, eqn.source_info)
      outs.append(val)
    else:
      outs.append(key)
  return token, outs


def _patched_interpret(orig):
  """Wraps `JaxprInterpreter.interpret` to route `run_state_p` to the handler.

  A jaxpr without run_state goes straight to `orig`. Otherwise each other eqn
  is interpreted by `orig` as a one-eqn jaxpr (trace-time cost only), so the
  token threads through the run_state handler in program order.
  """
  def interpret(self, jaxpr, token, *args):
    if not any(e.primitive is state_discharge.run_state_p for e in jaxpr.eqns):
      return orig(self, jaxpr, token, *args)
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], args))
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      if eqn.primitive is state_discharge.run_state_p:
        token, outs = _interpret_run_state(
            self, eqn, token, [read(v) for v in eqn.invars])
        outvars = eqn.outvars
      else:
        invars = list(dict.fromkeys(
            v for v in eqn.invars if not isinstance(v, jax_core.Literal)))
        outvars = [v for v in eqn.outvars
                   if not isinstance(v, jax_core.DropVar)]
        one = jax_core.Jaxpr([], invars, outvars, [eqn], eqn.effects,
                             debug_info=_ONE_EQN_DEBUG_INFO)
        token, outs = orig(self, one, token, *[env[v] for v in invars])
      env.update(zip(outvars, outs))
    return token, [read(v) for v in jaxpr.outvars]
  return interpret


# -- 2. wgmma with a register LHS ----------------------------------------------
# Upstream gap: `_interpret_wgmma_ref_p` resolves all three operands as
# allocation keys, so `plgpu.wgmma(acc, p16, v_smem)` (LHS in registers, as in
# FA3's P @ V and dS @ K) fails. We stage the register LHS in a temporary REGS
# buffer and hand its key to the stock handler.
# Delete when upstream JAX handles it.

def _patched_wgmma(orig):
  def handler(self, eqn, token, get_invals):
    if isinstance(eqn.invars[1].aval, state_types.AbstractRef):
      return orig(self, eqn, token, get_invals)
    acc, lhs, rhs, *leaves = get_invals()
    token, key = _alloc_regs(self, token, lhs, eqn.source_info)
    token, out = orig(self, eqn, token, lambda: [acc, key, rhs, *leaves])
    return _free(self, token, key, eqn.source_info), out
  return handler


# -- 3. predicated SMEM -> GMEM copy -------------------------------------------
# Upstream gap: `gpu_callbacks.copy_smem_to_gmem` raises on any `predicate`.
# The predicate only says whether the copy is issued, so we skip the copy when
# it is false and run the stock copy without it when true. A copy with a
# `reduction_op` goes to piece 7 instead.
# Delete when upstream JAX handles it.

def _patched_copy_smem_to_gmem(orig):
  def copy(*, token, predicate, reduction_op=None, **kwargs):
    if predicate is not None and not bool(np.asarray(predicate)):
      return token
    if reduction_op is not None:
      _reduce_into_gmem(reduction_op, **kwargs)
      return token
    return orig(token=token, predicate=None, reduction_op=None, **kwargs)
  return copy


# -- 4. barrier teardown -------------------------------------------------------
# Upstream gap: `Barrier.deallocate` raises when a thread that waited on a
# barrier did not observe its last completed phases. A TMA ring's last
# "consumed" phases are never waited on by the producer, which is harmless on
# hardware. We keep the pending-arrivals check and drop the phase check.
# Delete when upstream JAX handles it.

def _barrier_deallocate(self):
  with self.cv:
    self.ref_count -= 1
    if self.ref_count > 0:
      return
    if self.arrivals_count != 0:
      raise ValueError(
          f"Barrier deallocated with {self.arrivals_count} arrivals pending.")


# -- 5. the end-of-kernel barrier check on several devices ---------------------
# Upstream gap: after its grid, each device asserts that no mbarrier remains
# allocated, but the check reads every device's memory: under jax.pmap or
# jax.shard_map over 2+ devices, one device that finishes first sees another's
# live barriers and fails. We let every device reach the check first (the
# interpreter's device barrier; a failed device aborts it, so none waits
# forever).
# Delete when upstream JAX handles it.

def _patched_assert_no_barriers(orig):
  def check(token):
    gpu_callbacks._get_shared_memory().barrier.wait()
    return orig(token)
  return check


# -- 6. register-buffer ids on several devices ---------------------------------
# Upstream gap: when a cluster (thread block) finishes, `cluster_finished`
# resets the per-cluster state of *every* device, on the premise that
# clusters run one after another. Under jax.pmap or jax.shard_map the
# devices run theirs at the same time, so one device's reset restarts
# another's REGS buffer ids (-100, -101, ...) while its buffers are live: a
# fresh wgmma accumulator then takes a live buffer's key, the first free
# drops both, and the next read fails ("KeyError: HostAllocationKey(...)"),
# after which the failed device waits forever for the others at clean-up.
# We number REGS buffers from a counter the reset does not touch; ids stay
# unique per warpgroup for the whole kernel (the shared memory is rebuilt
# for the next one). Delete when upstream JAX handles it.

def _next_regs_id(self, thread):
  with self.lock:
    ids = self.__dict__.setdefault(
        "_fusedlm_regs_ids", collections.defaultdict(lambda: -100))
    regs_id = ids[thread]
    ids[thread] = regs_id - 1
    return regs_id


# -- 7. TMA reduce-add into global memory ---------------------------------------
# Upstream gap: `gpu_callbacks.copy_smem_to_gmem` raises on any
# `reduction_op` ("reduction_op not supported"); the dQ of the dK/dV kernel
# (MosaicBlockSizes.dq_atomic) adds float32 tiles into global memory with
# `reduction_op="add"` (cp.reduce.async.bulk). We read the shared-memory
# tile and the global window and write their sum back, under one lock: on
# hardware the add is atomic per element, and it completes before the
# matching wait, which doing it at issue time honours. Delete when upstream
# JAX handles it.

_REDUCE_LOCK = threading.Lock()


def _reduce_into_gmem(op, *, mesh_location, thread, src_allocation_key_as_array,
                      src_transforms, dst_allocation_key_as_array, dst_transforms,
                      source_info, commit_group):
  del commit_group
  if op != "add":
    raise NotImplementedError(f"reduction_op={op!r} (the shim adds only)")
  memory = gpu_callbacks._get_shared_memory()
  info = shared_memory.GPULoggingInfo(mesh_location, thread, source_info)

  def window(key_array, transforms):
    key = shared_memory.HostAllocationKey.from_array(key_array)
    transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms))
    return key, memory.access(key, transforms)

  src, src_access = window(src_allocation_key_as_array, src_transforms)
  dst, dst_access = window(dst_allocation_key_as_array, dst_transforms)
  with _REDUCE_LOCK:
    tile, _, _ = memory.get_buffer_content(src, src_access, thread, logging_info=info)
    total, _, _ = memory.get_buffer_content(dst, dst_access, thread, logging_info=info)
    if tile is None or total is None or tile.shape != total.shape:
      raise IndexError(f"reduce-add out of bounds: [{src_access}] into [{dst_access}]")
    memory.store_buffer_content(dst, dst_access, total + tile, thread, logging_info=info)


# -- the context manager -------------------------------------------------------

def _patches():
  """(owner, attribute, replacement) for every patched piece."""
  interp = jaxpr_interpret.JaxprInterpreter
  return [
      (interp, "interpret", _patched_interpret(interp.interpret)),
      (interp, "_interpret_wgmma_ref_p",
       _patched_wgmma(interp._interpret_wgmma_ref_p)),
      (gpu_callbacks, "copy_smem_to_gmem",
       _patched_copy_smem_to_gmem(gpu_callbacks.copy_smem_to_gmem)),
      (shared_memory.Barrier, "deallocate", _barrier_deallocate),
      (gpu_callbacks, "_assert_no_barriers_allocated",
       _patched_assert_no_barriers(gpu_callbacks._assert_no_barriers_allocated)),
      (shared_memory.GPUSharedMemory, "get_next_wgmma_accumulator_id", _next_regs_id),
  ]


@contextlib.contextmanager
def mosaic_interpreter(params=None, force=True):
  """Patches the Mosaic GPU interpreter for the duration of the context.

  Args:
    params: the `InterpretGPUParams` to use (default `PARAMS`).
    force: also force interpret mode, so `plgpu.kernel` / `pl.pallas_call`
      traced inside run on CPU without an `interpret=` argument.

  Yields the params. Not thread-safe: the patches are process-global. After
  an interpreter failure the interpreter's global state is reset, as JAX asks.
  """
  if not SUPPORTED:
    raise RuntimeError(REASON)
  params = PARAMS if params is None else params
  patches = _patches()
  saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
  for owner, name, new in patches:
    setattr(owner, name, new)
  try:
    with contextlib.ExitStack() as stack:
      if force:
        stack.enter_context(plgpu.force_gpu_interpret_mode(params))
      yield params
  except BaseException:
    gpu_callbacks.reset_gpu_interpret_mode_state()
    raise
  finally:
    for owner, name, old in saved:
      setattr(owner, name, old)
