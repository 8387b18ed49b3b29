"""Every private torch interface Hypatia uses, in this one module.

Public extension points do most of the work (``torch.library`` custom ops, Inductor's custom
graph pass hook, ``torch._inductor.list_mode_options``, ``make_fx``), but four things have no
public form (and one label for people):

- ``compile_fx``: Inductor's entry point for an FX graph (what ``backend="inductor"`` calls),
  given the rewritten graph instead of Dynamo's;
- the Dynamo metadata of a graph's inputs (their sources and which are parameters), which
  AOTAutograd reads to know which inputs keep their address across calls, so that CUDA graphs
  do not copy the parameters on every replay; a rewritten graph carries Dynamo's over;
- cudagraph trees (``cudagraphify_impl``) for graphs that Inductor does not compile;
- the Python dispatcher, under which AOTAutograd traces (and so must the model graph);
- the frame Dynamo is compiling (``InstructionTranslator.current_tx``), whose module names the
  model a plan is shown for in ``hypatia-ctl plans``;
- Dynamo's tracing context, re-entered for an Inductor compile made after Dynamo's (its caches
  need the context's shape environment), with the context's fake mode told the static sizes
  Dynamo traced the inputs with (``example_value`` in a placeholder's metadata), so that it
  compiles, and is keyed, as the compile made during Dynamo's;
- the cache artifacts of one compile: ``torch.compiler.save_cache_artifacts`` gives everything
  the process compiled so far, so the artifacts of one graph are recorded apart through the
  artifact manager's ``with_fresh_cache`` (and handed back to the process-wide record), and
  the settings that change compiled code through the config modules' ``save_config_portable``.
- for the ``hypatia`` device: torch's set-up of the PrivateUse1 key as a backend written in
  Python (``_setup_privateuseone_for_python_backend``: the rename, the generated methods, a device
  module, and the hooks and device guard autograd's engine asks a backend for), and the
  ``DynamicOutputShapeException`` meta kernels raise for ops whose output size depends on data;
  and CUDA IPC between a client with the daemon's GPU and the daemon (torch.multiprocessing's
  reduction of a CUDA tensor and its rebuild, in plain fields instead of a pickle);
- for the artifacts folder (``HYPATIA_ARTIFACTS``) only: the id of the frame compile in progress,
  torch's structured trace logger (Inductor's output code, guards and graph breaks arrive
  there), and AOTAutograd's graphs of a copy of Dynamo's graph.

Each is used only through a function here. :data:`TESTED` is the range of torch versions these
were written and tested against; ``tests/test_torch_internals.py`` checks every symbol, so a torch
upgrade that moves one fails there, loudly, and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx

log = logging.getLogger("hypatia.client")

TESTED = ((2, 11), (2, 13))  # torch (major, minor), first and last


class UntestedTorchWarning(RuntimeWarning):
    """This torch is outside the range Hypatia's private-interface module was tested with."""


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@functools.cache
def check_torch() -> bool:
    """Whether this torch is in :data:`TESTED`; warns once when it is not (the interfaces are
    still tried, and any failure makes a graph run eagerly)."""
    version = torch_version()
    if TESTED[0] <= version <= TESTED[1]:
        return True
    warnings.warn(
        f"torch {torch.__version__} is outside the versions Hypatia was tested with "
        f"({'.'.join(map(str, TESTED[0]))} to {'.'.join(map(str, TESTED[1]))}); its Inductor and CUDA graph "
        "executors use private torch interfaces (hypatia.client.torch_internals) that may have moved",
        UntestedTorchWarning,
        stacklevel=2,
    )
    return False


# -- Inductor ---------------------------------------------------------------------------------


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config_patches: dict[str, Any]) -> Callable:
    """Inductor on ``gm`` exactly as ``torch.compile(backend="inductor")`` runs it on a Dynamo
    graph (AOTAutograd with Inductor's decompositions, partitioner and caches), under
    ``config_patches``. ``gm`` is consumed."""
    from torch._inductor.compile_fx import compile_fx

    check_torch()
    return compile_fx(gm, list(example_inputs), config_patches=config_patches)


def inductor_counters() -> dict[str, int]:
    """Inductor's own cache counters (FX graph cache and AOTAutograd cache hits and misses)."""
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["inductor"].items() if "cache" in k}


class Recorded:
    """What :func:`recording_artifacts` recorded: the serialized artifacts (None when the compile
    made none, e.g. Inductor's caches are off) and how many of each kind."""

    content: bytes | None = None
    kinds: dict[str, int]

    def __init__(self) -> None:
        self.kinds = {}


@contextlib.contextmanager
def recording_artifacts():
    """Record the cache artifacts of what compiles inside (Inductor's FX graph entries with
    their Triton kernels, AOTAutograd's entries) apart from the rest of the process; they are
    also added to the process-wide record afterwards, so that a user's own
    ``torch.compiler.save_cache_artifacts()`` still includes them."""
    from torch.compiler._cache import CacheArtifactManager

    check_torch()
    recorded = Recorded()
    with CacheArtifactManager.with_fresh_cache():
        yield recorded
        new = {kind: list(items) for kind, items in CacheArtifactManager._new_cache_artifacts.items()}
        serialized = CacheArtifactManager.serialize()
    if serialized is not None:
        recorded.content = serialized[0]
        recorded.kinds = {kind: len(keys) for kind, keys in serialized[1].artifacts.items()}
    for kind, items in new.items():
        for artifact in items:
            if artifact not in CacheArtifactManager._seen_artifacts:
                CacheArtifactManager._new_cache_artifacts[kind].append(artifact)
                CacheArtifactManager._seen_artifacts.add(artifact)


def dynamo_tracing_context() -> Any:
    """The tracing context of the graph Dynamo is compiling (None outside a compile)."""
    from torch._guards import TracingContext

    return TracingContext.try_get()


def within_tracing_context(context: Any):
    """Re-enter Dynamo's tracing ``context`` for a compile made after Dynamo's own (an executor
    candidate built on a later call): Inductor's FX graph and AOTAutograd caches need its shape
    environment, and bypass themselves without it (so that compile's code could not be shared).
    A no-op inside a compile, or without a context."""
    from torch._guards import TracingContext, tracing

    if context is None or TracingContext.try_get() is not None:
        return contextlib.nullcontext()
    return tracing(context)


def remember_static_fakes(gm: torch.fx.GraphModule, context: Any, inputs: Sequence[Any]) -> list:
    """Make ``context``'s fake mode remember a fake with the static sizes Dynamo traced for each
    tensor of ``inputs`` (the inputs of a compile made after Dynamo's), and return those fakes:
    the caller holds them for the compile, since the fake mode holds its fakes weakly. AOTAutograd
    fakes the real inputs it is given through that memory; where an input's fake is gone by then
    (collected since Dynamo's compile), it makes one afresh with symbolic sizes, and the compile
    would generate dynamic-shape code under other keys. The compile is still given the real
    tensors: AOTAutograd's own cache key is made from them. An input Dynamo traced with symbolic
    sizes (``example_value`` in a placeholder's metadata), or that is not what it traced, is left
    alone."""
    from torch._subclasses.fake_tensor import FakeTensor

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = getattr(context, "fake_mode", None)
    if len(placeholders) != len(inputs) or fake_mode is None:
        return []
    fakes = []
    for node, value in zip(placeholders, inputs):
        traced = node.meta.get("example_value")
        if (isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and isinstance(traced, FakeTensor)
                and all(isinstance(d, int) for d in (*traced.shape, *traced.stride(), traced.storage_offset()))
                and traced.shape == value.shape and traced.dtype == value.dtype and traced.device == value.device):
            fakes.append(fake_mode.from_tensor(value, static_shapes=True))
    return fakes


def compiler_settings() -> list:
    """The settings of Inductor and AOTAutograd that change the code they generate (the
    portable part of each config module), as plain data."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return [inductor_config.save_config_portable(), functorch_config.save_config_portable()]


# -- tracing as AOTAutograd traces --------------------------------------------------------------


def python_dispatcher():
    """The Python dispatcher, under which AOTAutograd traces: its decompositions (batch norm to
    ``_native_batch_norm_legit*``, ...) give the model graph the operators Hypatia's rules and
    Inductor expect."""
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()


# -- Dynamo's input metadata ------------------------------------------------------------------

_PLACEHOLDER_META = ("tensor_dict", "grapharg", "example_value")
_GRAPH_META = ("dynamo_flat_name_to_original_fqn", "dynamo_compile_id", "backend_id")


def carry_dynamo_metadata(dst: torch.fx.GraphModule, src: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give ``dst`` (a graph traced from Dynamo's ``src``, with the same inputs in the same
    order) the metadata Dynamo put on ``src``'s inputs, so that AOTAutograd treats it as the
    same Dynamo graph: parameters are static inputs, and CUDA graphs keep them in place."""
    src_inputs = [n for n in src.graph.nodes if n.op == "placeholder"]
    dst_inputs = [n for n in dst.graph.nodes if n.op == "placeholder"]
    if len(src_inputs) != len(dst_inputs):
        raise ValueError(f"graphs have {len(src_inputs)} and {len(dst_inputs)} inputs; they are not the same function")
    for s, d in zip(src_inputs, dst_inputs):
        if hasattr(s, "_dynamo_source"):
            d._dynamo_source = s._dynamo_source
        for key in _PLACEHOLDER_META:
            if key in s.meta and key not in d.meta:
                d.meta[key] = s.meta[key]
    if hasattr(src, "_param_name_to_source"):
        dst._param_name_to_source = src._param_name_to_source
        # Tensors the trace baked in (``torch.tensor([...])`` in model code) are constants, not
        # parameters Dynamo has a source for: plain attributes, as AOTAutograd expects.
        for name in [n for n in dst._buffers if n not in src._param_name_to_source]:
            value = dst._buffers.pop(name)
            setattr(dst, name, value)
    for key in _GRAPH_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    return dst


def static_input_indices(gm: torch.fx.GraphModule) -> list[int]:
    """The inputs of a Dynamo graph that Dynamo marked static (parameters and buffers)."""
    return [i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
            if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]


def compiled_model_name() -> str:
    """The class of the module whose frame Dynamo is compiling (the function's name for a
    compiled function), or "" where Dynamo does not say: a label for people, never a key."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        frame_locals = getattr(tx, "f_locals", None) or {}
        module = next((v for v in frame_locals.values() if isinstance(v, torch.nn.Module)), None)
        if module is not None:
            return type(module).__name__
        name = tx.f_code.co_qualname
        return "" if "<" in name else name.removesuffix(".forward")
    except Exception:  # noqa: BLE001 - a missing label must never cost a compile
        return ""


# -- cudagraph trees for graphs Inductor does not compile --------------------------------------


def cudagraph_trees(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], on_skip: Callable[[str], None]) -> Callable:
    """``gm`` through AOTAutograd, its forward and backward graphs each recorded once and
    replayed as CUDA graphs by cudagraph trees (what ``mode="reduce-overhead"`` uses), with
    Dynamo's static inputs (the parameters) kept in place. A graph torch's own checks refuse
    runs without CUDA graphs, and ``on_skip`` is told why."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.cudagraphs import check_for_skip, find_input_mutations, get_device_index, get_stack_traces
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.cudagraph_trees import cudagraphify_impl, get_manager
    from torch._inductor.cudagraph_utils import get_placeholder_info
    from torch._inductor.utils import count_tangents, num_fw_fixed_arguments

    check_torch()
    forward_device: list[int | None] = [None]
    captured = [True]

    def record(aot_gm: torch.fx.GraphModule, aot_inputs: list, fixed: int, static: Sequence[int], backward: bool,
               inference: bool) -> Callable:
        interp = boxed_nop(aot_gm, aot_inputs)
        device = get_device_index(aot_gm)
        if not backward:
            forward_device[0] = device
        out = cudagraphify_impl(
            interp, aot_inputs, sorted(set(static)), device_index=device, is_backward=backward, is_inference=inference,
            stack_traces=get_stack_traces(aot_gm), placeholders=get_placeholder_info(aot_gm.graph),
            mutated_input_idxs=find_input_mutations(aot_gm.graph),
        )
        out._boxed_call = True
        return out

    def forward(aot_gm: torch.fx.GraphModule, aot_inputs: list, is_inference: bool = False) -> Callable:
        fixed = num_fw_fixed_arguments(len(example_inputs), len(aot_inputs))
        context = torch._guards.TracingContext.try_get()
        marked = list(context.fw_metadata.static_input_indices) if context and context.fw_metadata else []
        skip = check_for_skip(aot_gm, fixed)
        if skip:
            on_skip(skip)
            captured[0] = False
            return boxed_nop(aot_gm, aot_inputs)
        return record(aot_gm, aot_inputs, fixed, [*range(fixed), *marked], False, is_inference)

    def backward(aot_gm: torch.fx.GraphModule, aot_inputs: list) -> Callable:
        if not captured[0]:  # the forward runs without CUDA graphs, so does its backward
            return aot_gm
        fixed = count_tangents(aot_gm)
        skip = check_for_skip(aot_gm, fixed)
        if not skip:
            return record(aot_gm, aot_inputs, fixed, range(fixed), True, False)
        on_skip(skip)
        # a captured forward with an uncapturable backward: the tree must know the backward runs
        manager = get_manager(forward_device[0] or 0, create_if_none_exists=False)

        def run(inputs: list) -> Any:
            if manager is not None:
                manager.set_to_running_backward()
            return aot_gm(inputs)

        run._boxed_call = True
        return run

    compiler = aot_autograd(fw_compiler=forward, bw_compiler=backward,
                            inference_compiler=functools.partial(forward, is_inference=True))
    return compiler(gm, list(example_inputs))


# -- what the artifacts folder (HYPATIA_ARTIFACTS) reads -----------------------------------------


def current_compile_id() -> str | None:
    """Dynamo's id of the frame compile in progress (``"frame/attempt"``, as its logs print it),
    or None outside a compile."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is None or compile_id.frame_id is None:
        return None
    return f"{compile_id.frame_id}/{compile_id.frame_compile_id}"


def structured_trace_logger() -> logging.Logger:
    """The logger of torch's structured trace (what ``TORCH_TRACE`` writes and tlparse reads):
    each record carries ``metadata`` (the event, its compile id) and ``payload``. Torch builds
    the events only while the logger has a handler, and it must pass DEBUG records."""
    from torch._logging._internal import trace_log

    return trace_log


def aot_graphs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], training: bool) -> dict[str, torch.fx.GraphModule]:
    """AOTAutograd's graphs for a copy of Dynamo's ``gm``: ``{"forward", "backward"}`` in
    training, ``{"inference"}`` otherwise. Traced on fake inputs of their own, in a tracing
    context of their own, so that the compile in progress is left as it was."""
    import copy

    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    check_torch()
    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str) -> Callable:
        def compiler(aot_gm: torch.fx.GraphModule, aot_inputs: Any) -> Callable:
            graphs[name] = aot_gm
            return aot_gm.forward
        return compiler

    with unset_fake_temporarily():
        fake_mode = FakeTensorMode()
        with fake_mode:
            fakes = [torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device=x.device)
                     .requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with tracing(TracingContext(fake_mode)), fake_mode, torch.enable_grad() if training else torch.no_grad():
            from torch._functorch import config as functorch_config

            with functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False):
                # a graph of its own over the same attributes (parameters are not copied)
                aot_module_simplified(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)), fakes, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                                      inference_compiler=keep("inference"))
    return graphs


# -- the hypatia device ----------------------------------------------------------------------
def setup_python_backend(name: str, module: Any) -> None:
    """Make PrivateUse1 the device ``name`` with ``module`` as ``torch.<name>``: the public
    rename and method generation, plus the hooks and device guard that autograd's engine needs
    from a backend (torch's Python-backend set-up is the one place those can be given)."""
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename=name, backend_module=module)


def dynamic_output_shape_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a meta kernel raises for an op whose output size depends on the data."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    return (DynamicOutputShapeException,)


# -- CUDA IPC (the hypatia device, a client with the daemon's GPU) ---------------------------
IPC_FIELDS = {"size": (list,), "stride": (list,), "offset": (int,), "dtype": (str,), "handle": (bytes,),
              "size_bytes": (int,), "offset_bytes": (int,), "ref_counter_handle": (bytes,), "ref_counter_offset": (int,),
              "event_handle": (bytes, type(None)), "event_sync_required": (bool,)}  # a description's fields, their types


def cuda_ipc_export(t: torch.Tensor) -> dict:
    """A CUDA tensor's memory as another process of this host opens it (torch.multiprocessing's
    reduction: the allocation's IPC handle, the producer's reference counter, and an event the
    consumer waits on, so that work queued on ``t`` finishes first), in plain fields."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(t.detach())
    (_, size, stride, offset, _, dtype, _, handle, size_bytes, offset_bytes, _, rc_handle, rc_offset, event,
     sync) = args
    return dict(zip(IPC_FIELDS, (list(size), list(stride), int(offset), str(dtype).removeprefix("torch."), bytes(handle),
                                  int(size_bytes), int(offset_bytes), bytes(rc_handle), int(rc_offset),
                                  None if event is None else bytes(event), bool(sync))))


def cuda_ipc_import(fields: dict, device_index: int) -> torch.Tensor:
    """The tensor :func:`cuda_ipc_export` described, opened on this process's ``device_index``
    (the same GPU; the caller checks that, and the fields' types)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    f = [fields[k] for k in IPC_FIELDS]
    f[3] = getattr(torch, f[3])
    size, stride, offset, dtype, handle, size_bytes, offset_bytes, rc_handle, rc_offset, event, sync = f
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(size), tuple(stride), offset, torch.UntypedStorage, dtype,
                               device_index, handle, size_bytes, offset_bytes, False, rc_handle, rc_offset, event, sync)
