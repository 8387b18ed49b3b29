"""The private torch interfaces Hypatia uses are all where ``hypatia.client.torch_internals``
expects them: a torch upgrade that moves one fails here, by name, and nowhere else first."""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch

from hypatia.client import torch_internals

# (module, attribute, parameters the call passes by name)
PRIVATE = [
    ("torch._inductor.compile_fx", "compile_fx", ("config_patches",)),
    ("torch._inductor", "list_mode_options", ()),
    ("torch._inductor.custom_graph_pass", "CustomGraphPass", ()),
    ("torch._dispatch.python", "enable_python_dispatcher", ()),
    ("torch._dynamo.backends.common", "aot_autograd", ()),
    ("torch._dynamo.backends.cudagraphs", "check_for_skip", ()),
    ("torch._dynamo.backends.cudagraphs", "find_input_mutations", ()),
    ("torch._dynamo.backends.cudagraphs", "get_device_index", ()),
    ("torch._dynamo.backends.cudagraphs", "get_stack_traces", ()),
    ("torch._dynamo.backends.debugging", "boxed_nop", ()),
    ("torch._inductor.cudagraph_trees", "cudagraphify_impl", ()),
    ("torch._inductor.cudagraph_trees", "get_manager", ("create_if_none_exists",)),
    ("torch._inductor.cudagraph_utils", "get_placeholder_info", ()),
    ("torch._inductor.utils", "count_tangents", ()),
    ("torch._inductor.utils", "num_fw_fixed_arguments", ()),
    ("torch._dynamo.utils", "counters", ()),
    ("torch._guards", "detect_fake_mode", ()),
    ("torch._guards", "TracingContext", ()),
    ("torch._guards", "tracing", ()),
    ("torch._subclasses.fake_tensor", "FakeTensor", ()),
    ("torch._dynamo.symbolic_convert", "InstructionTranslator", ()),
    ("torch.compiler._cache", "CacheArtifactManager", ()),
    ("torch._inductor.config", "save_config_portable", ()),
    ("torch._functorch.config", "save_config_portable", ()),
    ("torch._functorch.config", "force_non_lazy_backward_lowering", ()),
    ("torch._functorch.config", "enable_autograd_cache", ()),
    ("torch._functorch.aot_autograd", "aot_module_simplified", ("fw_compiler", "bw_compiler", "inference_compiler")),
    ("torch._subclasses.fake_tensor", "FakeTensorMode", ()),
    ("torch._subclasses.fake_tensor", "unset_fake_temporarily", ()),
    ("torch._guards", "CompileContext", ()),
    ("torch._logging._internal", "trace_log", ()),
    ("torch.utils.backend_registration", "_setup_privateuseone_for_python_backend", ("rename", "backend_module")),
    ("torch._subclasses.fake_tensor", "DynamicOutputShapeException", ()),
    ("torch.multiprocessing.reductions", "reduce_tensor", ()),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor", ("storage_handle", "ref_counter_handle", "event_handle",
                                                                 "event_sync_required")),
]


@pytest.mark.parametrize("module,name,keywords", PRIVATE, ids=[f"{m}.{n}" for m, n, _ in PRIVATE])
def test_every_private_interface_is_where_hypatia_expects_it(module, name, keywords):
    value = getattr(importlib.import_module(module), name)
    if keywords:
        parameters = inspect.signature(value).parameters
        assert all(k in parameters for k in keywords), (module, name, list(parameters))


def test_this_torch_is_in_the_tested_range_and_another_is_warned_about(monkeypatch):
    assert torch_internals.TESTED[0] <= torch_internals.torch_version() <= torch_internals.TESTED[1]
    torch_internals.check_torch.cache_clear()
    monkeypatch.setattr(torch, "__version__", "9.0.0")
    with pytest.warns(torch_internals.UntestedTorchWarning, match="torch 9.0.0 is outside"):
        assert torch_internals.check_torch() is False
    torch_internals.check_torch.cache_clear()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch_internals.check_torch() is True


def test_dynamo_graphs_carry_the_metadata_aot_autograd_reads():
    """What :func:`carry_dynamo_metadata` copies is what Dynamo sets today."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(torch.nn.Linear(4, 4), backend=backend)(torch.randn(2, 4))
    torch._dynamo.reset()
    gm = seen["gm"]
    assert hasattr(gm, "_param_name_to_source") and "dynamo_compile_id" in gm.meta
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert all(hasattr(n, "_dynamo_source") and "tensor_dict" in n.meta for n in inputs)
    assert torch_internals.static_input_indices(gm) == [0, 1]  # weight and bias, not the input


def test_one_compile_s_artifacts_are_recorded_apart_and_still_in_the_process_record(tmp_path, monkeypatch):
    """``recording_artifacts`` gives the artifacts of what compiles inside it, and the user's own
    ``save_cache_artifacts`` still sees them afterwards."""
    from torch.compiler._cache import CacheArtifactManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for attr in ("_new_cache_artifacts", "_seen_artifacts"):
        assert hasattr(CacheArtifactManager, attr)
    CacheArtifactManager.clear()
    torch._dynamo.reset()

    def f(x):
        return (x * 3).relu() + 1

    with torch_internals.recording_artifacts() as recorded:
        torch.compile(f, backend="inductor")(torch.randn(8))
    assert recorded.content and recorded.kinds.get("inductor", 0) >= 1, recorded.kinds
    assert recorded.kinds.get("aot_autograd", 0) == 1
    whole = torch.compiler.save_cache_artifacts()
    assert whole is not None and len(whole[1].inductor_artifacts) >= 1
    with torch_internals.recording_artifacts() as nothing:
        pass
    assert nothing.content is None and nothing.kinds == {}
    torch._dynamo.reset()


def test_a_candidate_compiled_after_dynamo_s_compile_is_cached_like_one_compiled_during_it(tmp_path, monkeypatch):
    """An executor candidate built on a later call (outside Dynamo's compile) re-enters Dynamo's
    tracing context: without it Inductor's caches bypass themselves and there is nothing to share."""
    from hypatia.client import executors
    from hypatia.client.executors import inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    seen = {}

    def backend(gm, example_inputs):
        seen.update(gm=gm, inputs=list(example_inputs), tracing=torch_internals.dynamo_tracing_context())
        return gm.forward

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.compile(m, backend=backend)(x)
        assert seen["tracing"] is not None and torch_internals.dynamo_tracing_context() is None
        graphs = executors.Graphs(seen["gm"], seen["inputs"], "cpu", False, tracing=seen["tracing"])
        with torch_internals.recording_artifacts() as recorded:
            compiled = inductor.build(graphs, seen["inputs"], cudagraphs=False)
        assert recorded.kinds.get("inductor") == 1 and recorded.kinds.get("aot_autograd") == 1, recorded.kinds
        out = compiled(*seen["inputs"])
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, m(x))
        without = executors.Graphs(seen["gm"], seen["inputs"], "cpu", False)  # what happened before
        with torch_internals.recording_artifacts() as bypassed:
            inductor.build(without, seen["inputs"], cudagraphs=False)
        assert bypassed.content is None
    torch._dynamo.reset()


def test_a_later_candidate_fakes_its_inputs_as_dynamo_traced_them_and_hits_the_compile_made_during_dynamo_s(
        tmp_path, monkeypatch):
    """A candidate compiled on a later call, after the fake mode has let go of the fakes of
    Dynamo's compile (it holds them weakly; on the GPU, with torch 2.11, they were gone and the
    candidate's code came out dynamic, under other keys), still compiles its inputs with the
    static sizes Dynamo traced, not with symbolic ones AOTAutograd would make afresh: it is the
    very compile made during Dynamo's and hits both of its cache entries."""
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensor

    from hypatia.client import executors
    from hypatia.client.executors import inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    counters.clear()
    seen = {}

    def backend(gm, example_inputs):
        context = torch_internals.dynamo_tracing_context()
        seen.update(gm=gm, inputs=list(example_inputs), tracing=context)
        return inductor.build(executors.Graphs(gm, list(example_inputs), "cpu", False, tracing=context),
                              list(example_inputs), cudagraphs=False)

    def forget(context):  # the state a later call can find: the fakes of Dynamo's compile collected
        context.fake_mode.fake_tensor_converter.tensor_memo.clear()  # (held weakly), and the tensors'
        context.tensor_to_context.clear()  # symbolic contexts gone

    def static(fake) -> bool:
        return all(isinstance(d, int) for d in (*fake.shape, *fake.stride()))

    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.compile(m, backend=backend)(x)
        assert counters["aot_autograd"]["autograd_cache_miss"] == 1 and counters["inductor"]["fxgraph_cache_miss"] == 1
        gm, inputs, context = seen["gm"], seen["inputs"], seen["tracing"]
        forget(context)
        assert not static(context.fake_mode.from_tensor(inputs[0]))  # the condition: afresh, symbolic
        forget(context)
        fakes = torch_internals.remember_static_fakes(gm, context, inputs)
        assert len(fakes) == len(inputs) == 5
        assert all(isinstance(f, FakeTensor) and f.fake_mode is context.fake_mode and static(f) for f in fakes)
        assert all(context.fake_mode.from_tensor(t) is f for t, f in zip(inputs, fakes))
        # a tensor that is not what Dynamo traced (another shape), or no fake mode: left alone
        other = list(inputs)
        other[next(k for k, t in enumerate(inputs) if t.shape == x.shape)] = torch.randn(5, 8)
        assert len(torch_internals.remember_static_fakes(gm, context, other)) == 4

        class Elsewhere:
            fake_mode = None

        assert torch_internals.remember_static_fakes(gm, Elsewhere(), inputs) == []
        del fakes
        graphs = executors.Graphs(gm, inputs, "cpu", False, tracing=context)
        forget(context)
        compiled = inductor.build(graphs, inputs, cudagraphs=False)
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1 and counters["aot_autograd"]["autograd_cache_miss"] == 1
        assert counters["inductor"]["fxgraph_cache_hit"] == 1 and counters["inductor"]["fxgraph_cache_miss"] == 1
        out = compiled(*inputs)
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, m(x))
        # AOTAutograd traced again (its cache off; some torch versions key it by the fakes it made):
        # the graph it gives Inductor has the static sizes, so Inductor's own entry is hit too
        forget(context)
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = inductor.build(graphs, inputs, cudagraphs=False)
        assert counters["inductor"]["fxgraph_cache_hit"] == 2 and counters["inductor"]["fxgraph_cache_miss"] == 1
        out = compiled(*inputs)
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, m(x))
    torch._dynamo.reset()
