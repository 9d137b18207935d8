"""`compile=True`: compiled decoding steps give what eager decoding gives, with one compiled program per step part
at every position (nothing is compiled again as positions, patches and prompts change). On a CPU the parts are
compiled ahead of time (`blt.inference.aot`); should that fail they run under torch.compile (the path a GPU
takes), and where neither can work decoding is eager, with a warning."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import blt
from blt.inference import aot, decoding, generate_recompute
from tests.helpers import LONG, PATCHERS, SHORT, generation_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # every model compiles anew, and dynamo's per-function cache never fills up
    counters.clear()
    yield
    torch._dynamo.reset()


def parts_built() -> int:
    return aot.STATS["compiled"] + aot.STATS["loaded"]


def test_compiled_generation_is_exact_and_never_compiles_again():
    model = generation_model("entropy-global")
    eager = [model.generate([p], 300, stop_at_eos=False)[0] for p in (SHORT, LONG)]
    # the first call compiles each part once (or loads it from the disk cache); the rest runs those programs
    # throughout: positions past the 16-byte window, ~75 patches (the global cache and the open-patch buffers
    # grow), new engines, prompts of another length
    before = parts_built()
    first = model.generate([SHORT], 32, stop_at_eos=False, compile=True)[0]
    assert parts_built() - before == 3  # byte part, patch closing, decoder
    compiled = [model.generate([p], 300, stop_at_eos=False, compile=True)[0] for p in (SHORT, LONG)]
    assert parts_built() - before == 3
    assert counters["stats"]["unique_graphs"] == 0  # no torch.compile graph on the way
    assert first == eager[0][:32]
    assert compiled == eager
    assert compiled[0][:100] == generate_recompute(model, [SHORT], 100, stop_at_eos=False)[0]


def test_a_new_model_of_the_same_shape_loads_the_compiled_parts_from_disk():
    a, b = generation_model("entropy-global", seed=0), generation_model("entropy-global", seed=1)
    a.generate([SHORT], 8, stop_at_eos=False, compile=True)  # compiled, or already on disk from an earlier run
    compiled, loaded = aot.STATS["compiled"], aot.STATS["loaded"]
    out = b.generate([SHORT], 96, stop_at_eos=False, compile=True)  # other weights: inputs of the same program
    assert (aot.STATS["compiled"], aot.STATS["loaded"]) == (compiled, loaded + 3)
    assert out == b.generate([SHORT], 96, stop_at_eos=False)


def test_compiled_parts_take_the_weights_as_they_are_now():
    # the weights are inputs of the compiled code, not copies inside it: a model changed after compiling
    # (trained further, say) generates with its new weights
    model = generation_model("entropy-global")
    model.generate([SHORT], 16, stop_at_eos=False, compile=True)
    with torch.no_grad():
        model.local_decoder.output.weight.mul_(-1.0)
        model.global_transformer.layers[0].ffn.w2.weight.mul_(0.5)
    assert model.generate([SHORT], 96, stop_at_eos=False, compile=True) == model.generate(
        [SHORT], 96, stop_at_eos=False
    )


def test_a_module_replaced_after_compiling_is_compiled_anew():
    model = generation_model("entropy-global")
    model.generate([SHORT], 16, stop_at_eos=False, compile=True)
    torch.manual_seed(5)
    model.local_decoder.output = torch.nn.Linear(*reversed(model.local_decoder.output.weight.shape), bias=False)
    before = parts_built()
    assert model.generate([SHORT], 64, stop_at_eos=False, compile=True) == model.generate(
        [SHORT], 64, stop_at_eos=False
    )
    assert parts_built() - before == 3


def test_under_torch_compile_one_graph_per_part_and_no_recompilation(monkeypatch):
    # the path a GPU takes (and a CPU where compiling ahead of time fails): dynamo graphs without guards
    def refuse(*args):
        raise RuntimeError("no AOTInductor here")

    monkeypatch.setattr(decoding, "CompiledPart", refuse)
    model = generation_model("entropy-global")
    eager = [model.generate([p], 300, stop_at_eos=False)[0] for p in (SHORT, LONG)]
    with pytest.warns(UserWarning, match="ahead of time failed .no AOTInductor here.; using torch.compile"):
        first = model.generate([SHORT], 32, stop_at_eos=False, compile=True)[0]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [model.generate([p], 300, stop_at_eos=False, compile=True)[0] for p in (SHORT, LONG)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert first == eager[0][:32]
    assert compiled == eager


def test_compiled_batch_rows_get_what_they_get_alone():
    # the model and batch size of the batch check in `test_graphs_run_without_guards_...`: one compiled set for both
    model = generation_model("entropy-global")
    prompts = [LONG, ""]
    together = model.generate(prompts, 200, temperature=0.8, top_k=50, seed=7, compile=True)
    alone = [model.generate([p], 200, temperature=0.8, top_k=50, seed=7)[0] for p in prompts]
    assert together == alone


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATCHERS))
def test_compiled_equals_eager_for_every_patcher(name):
    model = generation_model(name)
    prompts = [SHORT, LONG]
    eager = [model.generate([p], 512, stop_at_eos=False)[0] for p in prompts]
    assert [model.generate([p], 512, stop_at_eos=False, compile=True)[0] for p in prompts] == eager


def test_without_torch_compile_decoding_is_eager_with_a_warning(monkeypatch):
    model = generation_model("static")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.warns(UserWarning, match="torch.compile is not supported here"):
        out = model.generate([SHORT], 64, stop_at_eos=False, compile=True)
    assert out == model.generate([SHORT], 64, stop_at_eos=False)


def test_an_unusable_compile_cache_folder_means_eager_decoding_with_a_warning(monkeypatch, tmp_path):
    model = generation_model("static")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="compile cache folder cannot be used .*Not a directory.*; decoding eagerly"):
        out = model.generate([SHORT], 64, stop_at_eos=False, compile=True)
    assert out == model.generate([SHORT], 64, stop_at_eos=False)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_must_be_a_bool(value):
    with pytest.raises(blt.BltError, match="compile must be True or False"):
        generation_model("static").generate([SHORT], 4, compile=value)


def test_graphs_run_without_guards_yet_never_mix_models_settings_or_batch_sizes():
    # the graphs skip dynamo's guards: what they assume is held apart by model and engine signature instead
    a, b = generation_model("entropy-global", seed=0), generation_model("entropy-global", seed=1)
    eager = {name: m.generate([SHORT], 96, stop_at_eos=False) for name, m in (("a", a), ("b", b))}
    assert eager["a"] != eager["b"]
    for name, m in (("a", a), ("b", b), ("a", a)):
        assert m.generate([SHORT], 96, stop_at_eos=False, compile=True) == eager[name]
    pair = [SHORT, LONG]  # another batch size
    assert a.generate(pair, 96, stop_at_eos=False, compile=True) == a.generate(pair, 96, stop_at_eos=False)
    a.patcher.threshold += 0.5  # a setting the graph takes as fixed: a new signature, a new trace
    assert a.generate([SHORT], 96, stop_at_eos=False, compile=True) == a.generate([SHORT], 96, stop_at_eos=False)
