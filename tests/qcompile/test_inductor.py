"""The Inductor hand-off: mode given as torch.compile's mode= or options={"mode": ...} reaches Inductor;
fullgraph=True over a Llama with a static cache; a decode step never recompiles as the position
advances; a new batch size recompiles at most once; CUDA graphs (reduce-overhead) on the GPU."""
from __future__ import annotations

import pytest
import sympy
import torch

import qcompile.backend as qb


def _tiny_llama(layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def compiles(monkeypatch):
    """The list of graphs qoq compiled (one entry per Dynamo compile, recompiles included)."""
    seen: list[int] = []
    real = qb.compile_graph

    def counting(gm, example_inputs, config):
        seen.append(len(example_inputs))
        return real(gm, example_inputs, config)

    monkeypatch.setattr(qb, "compile_graph", counting)
    return seen


def _generate_static(fwd, lm, batch: int, steps: int, compiles: list, prompt: int = 4, device: str = "cpu"):
    """Prefill then `steps` greedy decode steps over a StaticCache; returns tokens and compiles per step."""
    from transformers import StaticCache

    cache = StaticCache(config=lm.config, max_cache_len=prompt + steps + 1)
    if device == "cuda":
        # Allocate the cache outside the compiled region (as generate does), so its tensors are static
        # addresses for CUDA graphs rather than outputs of the first graph's memory pool.
        cfg = lm.config
        cache.early_initialization(batch, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                   next(lm.parameters()).dtype, torch.device(device))
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    per_step, tokens = [], []
    with torch.no_grad():
        out = fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            pos = prompt + i
            before = len(compiles)
            out = fwd(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos], device=device),
                      position_ids=torch.full((batch, 1), pos, device=device), use_cache=True)
            per_step.append(len(compiles) - before)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
    return torch.cat(tokens, 1), per_step


def test_static_cache_decode_never_recompiles_per_step_and_batch_changes_recompile_once(compiles, monkeypatch):
    lm = _tiny_llama()
    torch._dynamo.reset()
    fwd = torch.compile(lm.forward, backend="qoq", fullgraph=True,
                        options={"inductor": False, "kernels": "reference"})
    _, steps = _generate_static(fwd, lm, 2, 5, compiles)
    assert steps[1:] == [0, 0, 0, 0]  # the first decode step compiles the decode graph, then never again
    assert len(compiles) == 2  # prefill + decode
    _, steps = _generate_static(fwd, lm, 3, 3, compiles)
    assert sum(steps) <= 1 and len(compiles) <= 4  # a new batch: each graph recompiles once, dynamic in batch
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    calibrations = []
    real = qb.calibrate_graph
    monkeypatch.setattr(qb, "calibrate_graph", lambda *a: calibrations.append(1) or real(*a))
    before = len(compiles)
    for batch in (5, 1):
        _, steps = _generate_static(fwd, lm, batch, 3, compiles)
    # after the dynamic recompile, Dynamo reuses it for other batch sizes (1 is specialized: one more at
    # most). Each new StaticCache gets its own KV4 buffers at run time, so qoq does not compile the
    # reused graphs again; a batch-1 graph replays the first quantization: no calibration.
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    assert len(compiles) - before <= 2
    assert calibrations == []
    # the dynamic graph still quantized every linear (no FP fallback on symbolic shapes)
    import qcompile

    last = qcompile.report(lm).graphs[-1]
    assert last.qoq_ops.get("qoq.w4a8_gemm") == 4  # q/k/v fused, o, gate/up fused, down


def test_fullgraph_with_the_decode_graph_matches_eager_qoq(compiles):
    """fullgraph=True succeeds and gives the same tokens as qoq without fullgraph (one graph either way)."""
    lm = _tiny_llama()
    torch._dynamo.reset()
    full = torch.compile(lm.forward, backend="qoq", fullgraph=True, options={"inductor": False, "kernels": "reference"})
    a, _ = _generate_static(full, lm, 2, 4, compiles)
    torch._dynamo.reset()
    loose = torch.compile(lm.forward, backend="qoq", options={"inductor": False, "kernels": "reference"})
    b, _ = _generate_static(loose, lm, 2, 4, compiles)
    assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["mode_kwarg", "option"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_mode_reaches_inductor_either_way(monkeypatch, how, mode):
    import torch._inductor.compile_fx as cfx
    from torch._inductor import list_mode_options

    patches = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        patches.append(config_patches)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).eval()
    torch._dynamo.reset()
    if how == "mode_kwarg":
        compiled = torch.compile(model, backend="qoq", mode=mode)
    else:
        compiled = torch.compile(model, backend="qoq", options={"mode": mode, "kernels": "reference"})
    with torch.no_grad():
        compiled(torch.randn(2, 32))
    assert patches == [list_mode_options(mode)] and patches[0]  # a mode that changes nothing would not test this


def test_mode_and_options_together_is_torch_compiles_error():
    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(torch.nn.Linear(2, 2), backend="qoq", mode="reduce-overhead", options={"recipe": "w4a8"})


@pytest.mark.cuda
@pytest.mark.parametrize("as_option", [False, True])
def test_reduce_overhead_cuda_graphs_static_cache_decode(compiles, as_option):
    """On the GPU: Inductor + CUDA graphs over the decode step; no recompiles per step, same tokens as
    the same qoq graphs without CUDA graphs."""
    lm = _tiny_llama(2).cuda().to(torch.bfloat16)
    kw = {"options": {"mode": "reduce-overhead", "strict": True}} if as_option else {"mode": "reduce-overhead"}
    torch._dynamo.reset()
    fwd = torch.compile(lm.forward, backend="qoq", fullgraph=True, **kw)
    got, steps = _generate_static(fwd, lm, 2, 6, compiles, device="cuda")
    assert steps[1:] == [0] * 5
    torch._dynamo.reset()
    plain = torch.compile(lm.forward, backend="qoq", fullgraph=True)
    want, _ = _generate_static(plain, lm, 2, 6, compiles, device="cuda")
    assert float((got == want).float().mean()) >= 0.9  # same graphs; CUDA graphs only replay them


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["qoq", "qoq-chn", "w4a8-g128"])
def test_every_llm_recipe_runs_its_passes_on_cuda(compiles, recipe):
    """strict=True: a pass that fails on CUDA tensors (a CPU-made index, say) raises here instead of
    leaving the graph in FP with a warning, which the CPU suite cannot see."""
    import qcompile

    lm = _tiny_llama(2).cuda().to(torch.bfloat16)
    torch._dynamo.reset()
    fwd = torch.compile(lm.forward, backend="qoq", fullgraph=True, options={"recipe": recipe, "strict": True})
    _generate_static(fwd, lm, 2, 3, compiles, device="cuda")
    graphs = qcompile.report(lm).graphs
    assert all(g.qoq_ops.get("qoq.w4a8_gemm") == 8 for g in graphs)  # 2 layers: qkv, o, gate/up, down
    if recipe != "w4a8-g128":
        assert all(g.qoq_ops.get("qoq.kv4_cache_attention") == 2 for g in graphs)


def test_regional_compilation_of_repeated_blocks_gets_each_blocks_weights():
    """Dynamo reuses one compiled graph for every instance of a repeated block (regional compilation);
    the packed weights baked into it belong to the first block, so the others must get their own."""
    import qcompile

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.relu(self.l(x))

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block().eval() for _ in range(3)])
    for b in blocks:
        b.compile(backend="qoq", options={"inductor": False, "kernels": "reference"})
    x = torch.randn(4, 64)
    with torch.no_grad():
        for b in blocks:
            ref = torch.relu(b.l(x))
            err = float((b(x) - ref).norm() / ref.norm())
            assert err < 0.2  # 4-bit noise ~0.07; another block's weights give ~1.1
    assert len(qcompile.report(blocks).graphs) == 3


def test_inductor_cache_key_carries_the_qoq_op_schemas(monkeypatch):
    """Inductor's caches normalize trailing default arguments away, so a qoq op whose schema changed
    could be served stale code: the schemas of the graph's qoq ops go into torch.compile's cache key
    tag for the compile, beside any tag the user set, and only for graphs that call qoq ops."""
    import torch._inductor.compile_fx as cfx
    import torch.fx as fx
    from torch.compiler import config as compiler_config

    import lowering.activation_quant  # noqa: F401  (registers qoq.quantize_act_int8)
    from qcompile.fallback import inductor_compile, qoq_schema_tag

    def with_op(x):
        return torch.ops.qoq.quantize_act_int8(x, "reference")[0]

    tagged, plain = fx.symbolic_trace(with_op), fx.symbolic_trace(lambda x: x * 2)
    tag = qoq_schema_tag(tagged)
    assert tag.startswith("qoq-ops-") and qoq_schema_tag(plain) == ""
    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, **kw: seen.append(compiler_config.cache_key_tag))
    with compiler_config.patch(cache_key_tag="users-own"):
        inductor_compile(tagged, [torch.randn(2, 8)])
        inductor_compile(plain, [torch.randn(2, 8)])
    assert seen == [f"users-own:{tag}", "users-own"]
    assert compiler_config.cache_key_tag == ""  # restored after the compile


def test_inductor_config_option_reaches_compile_fx(monkeypatch):
    """options={"inductor_config": {...}} patches Inductor's config on top of the mode's."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx
    def spy(gm, inputs, **kw):
        seen.append(kw.get("config_patches"))  # compile_fx calls itself again without them
        return real(gm, inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    model = _tiny_llama()
    compiled = torch.compile(model, backend="qoq", options={
        "recipe": "w4a8-g128", "kernels": "reference", "mode": "max-autotune-no-cudagraphs",
        "inductor_config": {"split_reductions": False}})
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 5)))
    assert seen and seen[0]["split_reductions"] is False and seen[0]["max_autotune"] is True


def test_persistent_reduction_numel_option_sets_inductors_choices(monkeypatch):
    """options={"persistent_reduction_numel": N}: during the compile Inductor asks our choices whether
    a row reduction is one-pass and whether to split it; inner reductions up to N elements are
    persistent and unsplit (Inductor decides the rest), and the rule is in the cache key tag."""
    from types import SimpleNamespace

    import torch._inductor.compile_fx as cfx
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V
    from torch.compiler import config as compiler_config

    from torch._inductor.choices import InductorChoices

    from qcompile.fallback import persistent_reduction_choices

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, cooperative: features.reduction_numel <= 1024))
    choices = persistent_reduction_choices(16384)
    row = lambda n, hint=ReductionHint.INNER, rows=16: SimpleNamespace(  # noqa: E731
        reduction_numel=n, get_reduction_hint=lambda: hint, numel=rows)
    assert choices.should_use_persistent_reduction(row(4096), False)
    assert choices.should_use_persistent_reduction(row(14336), False)
    assert choices.should_use_persistent_reduction(row(14336, rows=sympy.Symbol("s0")), False)  # any batch
    assert choices.should_use_persistent_reduction(row(14336, rows=1024), False)
    assert not choices.should_use_persistent_reduction(row(14336, rows=4096), False)  # Inductor's answer
    assert choices.should_use_persistent_reduction(row(512, rows=4096), False)  # Inductor's answer
    assert choices.should_use_persistent_reduction(row(512, ReductionHint.OUTER), False)  # Inductor's answer
    assert not choices.should_use_persistent_reduction(row(32768), False)
    assert not choices.should_use_persistent_reduction(row(4096), True)  # cooperative: Inductor's rule
    assert not choices.should_use_persistent_reduction(row(4096, ReductionHint.OUTER), False)
    monkeypatch.setattr(InductorChoices, "reduction_split_factor",
                        staticmethod(lambda device, rnumel, numel, inner: 8))
    assert choices.reduction_split_factor("cuda", 14336, 1, True) == 1  # a row we keep whole
    assert choices.reduction_split_factor("cuda", 1 << 20, 1, True) == 8  # Inductor's rule
    assert choices.reduction_split_factor("cuda", 4096, 1, False) == 8
    monkeypatch.undo()

    seen = []
    real = cfx.compile_fx

    def spy(gm, inputs, **kw):
        seen.append((type(V.choices).__name__, compiler_config.cache_key_tag))
        return real(gm, inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    compiled = torch.compile(_tiny_llama(), backend="qoq", options={
        "recipe": "w4a8-g128", "kernels": "reference", "persistent_reduction_numel": 16384})
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 5)))
    assert seen and seen[0][0] == "RowReductionChoices" and "qoq-persistent-16384" in seen[0][1]
    assert type(V.choices).__name__ != "RowReductionChoices"  # restored after the compile
