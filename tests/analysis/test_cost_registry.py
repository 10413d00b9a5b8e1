"""Cost registry (graphred.analysis.cost.registry) against sympy, torch's FlopCounterMode and the oracle."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import flop_counter as fc
from torch.utils._pytree import tree_flatten, tree_map

from graphred.analysis.cost import (
    KNOWN_ZERO_COST,
    REGISTRY,
    ZERO_COST,
    CostTotals,
    causal_pairs,
    count_flops_executed,
    count_graph,
    flop_counts_executed,
    install_cpu_sdpa_flop_formula,
    lookup,
)

aten = torch.ops.aten


def _export(model: nn.Module, args: tuple, **kw) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, **kw)


def _rel_close(a, b, tol=1e-3) -> bool:
    a, b = int(a), int(b)
    return abs(a - b) <= tol * max(abs(a), abs(b), 1)


# ---------------------------------------------------------------------------------------
# 1. every formula: ints == sympy symbols substituted with those ints
# ---------------------------------------------------------------------------------------

# (registry key, dim names, builder(d) -> (in_shapes, out_shapes, args, kwargs)); out_shapes=None
# exercises the formulas that derive the output shape themselves.
_CASES = [
    ("mm", aten.mm, "m k n", lambda d: ([(d.m, d.k), (d.k, d.n)], [(d.m, d.n)], None, None)),
    ("addmm", aten.addmm, "m k n", lambda d: ([(d.n,), (d.m, d.k), (d.k, d.n)], [(d.m, d.n)], None, None)),
    ("bmm", aten.bmm, "b m k n", lambda d: ([(d.b, d.m, d.k), (d.b, d.k, d.n)], [(d.b, d.m, d.n)], None, None)),
    ("baddbmm", aten.baddbmm, "b m k n",
     lambda d: ([(d.b, d.m, d.n), (d.b, d.m, d.k), (d.b, d.k, d.n)], [(d.b, d.m, d.n)], None, None)),
    ("matmul", aten.matmul, "b m k n", lambda d: ([(d.b, 1, d.m, d.k), (3, d.k, d.n)], [], None, None)),
    ("matmul-vec", aten.matmul, "m k", lambda d: ([(d.m, d.k), (d.k,)], [], None, None)),
    ("linear", aten.linear, "b m k n", lambda d: ([(d.b, d.m, d.k), (d.n, d.k), (d.n,)], [], None, None)),
    ("conv2d", aten.conv2d, "b c h w o",
     lambda d: ([(d.b, d.c, d.h + 4, d.w + 4), (d.o, d.c, 3, 3), (d.o,)], [],
                ((d.b, d.c, d.h + 4, d.w + 4), (d.o, d.c, 3, 3), (d.o,), [2, 2], [1, 1], [1, 1], 1), None)),
    ("convolution-groups", aten.convolution, "b c h o",
     lambda d: ([(d.b, 2 * d.c, d.h + 2, d.h + 2), (2 * d.o, d.c, 3, 3)], [],
                ((d.b, 2 * d.c, d.h + 2, d.h + 2), (2 * d.o, d.c, 3, 3), None, [1, 1], [0, 0], [1, 1], False,
                 [0, 0], 2), None)),
    ("conv_transpose2d", aten.conv_transpose2d, "b c h o",
     lambda d: ([(d.b, d.c, d.h, d.h), (d.c, d.o, 2, 2)], [], None, None)),
    ("einsum", aten.einsum, "b h q k d",
     lambda d: ([(d.b, d.h, d.q, d.d), (d.b, d.h, d.k, d.d)], [],
                ("bhqd,bhkd->bhqk", [(d.b, d.h, d.q, d.d), (d.b, d.h, d.k, d.d)]), None)),
    ("sdpa-gqa-causal", aten.scaled_dot_product_attention, "b g q k d",
     lambda d: ([(d.b, 4 * d.g, d.q, d.d), (d.b, d.g, d.k, d.d), (d.b, d.g, d.k, d.d + 1)], [],
                ((d.b, 4 * d.g, d.q, d.d), (d.b, d.g, d.k, d.d), (d.b, d.g, d.k, d.d + 1), None, 0.0, True),
                {"enable_gqa": True})),
    ("sdpa-cpu-mask", aten._scaled_dot_product_flash_attention_for_cpu, "b h q k d",
     lambda d: ([(d.b, d.h, d.q, d.d)] + [(d.b, d.h, d.k, d.d)] * 2 + [(d.q, d.k)], [],
                ((d.b, d.h, d.q, d.d), (d.b, d.h, d.k, d.d), (d.b, d.h, d.k, d.d), 0.0, True),
                {"attn_mask": (d.q, d.k)})),
    ("sdpa-efficient", aten._scaled_dot_product_efficient_attention, "b h q k d",
     lambda d: ([(d.b, d.h, d.q, d.d)] + [(d.b, d.h, d.k, d.d)] * 2, [],
                ((d.b, d.h, d.q, d.d), (d.b, d.h, d.k, d.d), (d.b, d.h, d.k, d.d), None, False, 0.0, True), None)),
    ("native_mha", aten._native_multi_head_attention, "b q k e",
     lambda d: ([(d.b, d.q, d.e), (d.b, d.k, d.e), (d.b, d.k, d.e)], [],
                ((d.b, d.q, d.e), (d.b, d.k, d.e), (d.b, d.k, d.e), d.e, 1, (3 * d.e, d.e), (3 * d.e,),
                 (d.e, d.e), (d.e,)), None)),
    ("softmax", aten._softmax, "b l", lambda d: ([(d.b, d.l, d.l)], [(d.b, d.l, d.l)], None, None)),
    ("layer_norm", aten.native_layer_norm, "b l c",
     lambda d: ([(d.b, d.l, d.c), (d.c,), (d.c,)], [(d.b, d.l, d.c), (d.b, d.l, 1), (d.b, d.l, 1)],
                ((d.b, d.l, d.c), [d.c], (d.c,), (d.c,), 1e-5), None)),
    ("rms_norm", aten.rms_norm, "b l c",
     lambda d: ([(d.b, d.l, d.c), (d.c,)], [(d.b, d.l, d.c)], ((d.b, d.l, d.c), [d.c], (d.c,), 1e-6), None)),
    ("add", aten.add, "b l c", lambda d: ([(d.b, d.l, d.c), (1, d.l, d.c)], [(d.b, d.l, d.c)], None, None)),
    ("add-broadcast", aten.add, "b l c", lambda d: ([(d.b, 1, d.c), (1, d.l, 1)], [], None, None)),
    ("gelu-tanh", aten.gelu, "b c", lambda d: ([(d.b, d.c)], [(d.b, d.c)], ((d.b, d.c),), {"approximate": "tanh"})),
    ("silu", aten.silu, "b c", lambda d: ([(d.b, d.c)], [(d.b, d.c)], None, None)),
    ("mean", aten.mean, "b l c", lambda d: ([(d.b, d.l, d.c)], [(d.b, d.c)], ((d.b, d.l, d.c), [1]), None)),
    ("topk", aten.topk, "b l", lambda d: ([(d.b, d.l)], [(d.b, 2), (d.b, 2)], ((d.b, d.l), 2, -1), None)),
    ("embedding", aten.embedding, "v c b l",
     lambda d: ([(d.v, d.c), (d.b, d.l)], [(d.b, d.l, d.c)], None, None)),
    ("cat", aten.cat, "b l c",
     lambda d: ([(d.b, d.l, d.c), (d.b, 3, d.c)], [(d.b, d.l + 3, d.c)], ([(d.b, d.l, d.c), (d.b, 3, d.c)], 1),
                None)),
    ("attention_scores", "graphred::attention_scores", "b g q k d",
     lambda d: ([(d.b, 2 * d.g, d.q, d.d), (d.b, d.g, d.k, d.d), (d.b, d.q)], [(d.b, d.k)],
                ((d.b, 2 * d.g, d.q, d.d), (d.b, d.g, d.k, d.d), (d.b, d.q), None, 0.5), None)),
    ("select_tokens", "graphred::select_tokens", "b l",
     lambda d: ([(d.b, d.l + 2), (d.b, d.l + 2)], [(d.b, d.l)], ((d.b, d.l + 2), (d.b, d.l + 2), 2), None)),
    ("gather_tokens", "graphred::gather_tokens", "b l k c",
     lambda d: ([(d.b, d.l, d.c), (d.b, d.k)], [(d.b, d.k, d.c)], ((d.b, d.l, d.c), (d.b, d.k), 1), None)),
    ("bipartite_match", "graphred::bipartite_match", "b l c",
     lambda d: ([(d.b, d.l + 1, d.c), (d.b, d.l + 1)], [(d.b, d.l), (d.b, 1), (d.b, 1)],
                ((d.b, d.l + 1, d.c), (d.b, d.l + 1), 1, None), None)),
    ("merge_tokens", "graphred::merge_tokens", "b l r c",
     lambda d: ([(d.b, d.l, d.c), (d.b, d.l), (d.b, d.r), (d.b, d.r)], [(d.b, d.l, d.c), (d.b, d.l)], None, None)),
]


def _evaluate(key, builder, dims: dict):
    ins, outs, args, kwargs = builder(SimpleNamespace(**dims))
    cost = lookup(key)
    assert cost is not None and cost is not ZERO_COST, key
    flops = {
        (kind, mode): cost.flops(ins, outs, args, kwargs, kind=kind, mode=mode)
        for kind in ("all", "matmul") for mode in ("full", "causal_executed")
    }
    dtypes = [torch.float16] * len(ins)
    nbytes = cost.bytes(ins, dtypes, outs, [torch.float32] * len(outs), args, kwargs)
    return flops, nbytes


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_formula_on_ints_equals_formula_on_symbols(case, data):
    _, key, names, builder = case
    ints = {n: data.draw(st.integers(1, 40), label=n) for n in names.split()}
    syms = {n: sympy.Symbol(n, positive=True, integer=True) for n in ints}
    f_int, b_int = _evaluate(key, builder, ints)
    f_sym, b_sym = _evaluate(key, builder, syms)
    subs = {syms[n]: v for n, v in ints.items()}
    for k, v in f_int.items():
        assert isinstance(v, sympy.Integer), (key, k, v)
        assert v >= 0
        assert sympy.simplify(f_sym[k].subs(subs)) == v, (key, k, f_sym[k])
    assert isinstance(b_int, sympy.Integer)
    assert sympy.simplify(b_sym.subs(subs)) == b_int
    assert f_int["matmul", "full"] <= f_int["all", "full"]
    assert f_int["matmul", "causal_executed"] <= f_int["matmul", "full"]


def test_registry_covers_the_brief():
    for name in ["mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "einsum",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                 "scaled_dot_product_attention", "_softmax", "_log_softmax", "layer_norm", "native_layer_norm",
                 "rms_norm", "_fused_rms_norm", "add", "mul", "sub", "div", "pow", "rsqrt", "exp", "silu", "gelu",
                 "tanh", "neg", "where", "sum", "mean", "amax", "embedding", "gather", "index_select", "index",
                 "scatter", "masked_scatter", "index_put", "cat", "clone", "_to_copy"]:
        assert getattr(aten, name) in REGISTRY, name
    for name in ["attention_scores", "select_tokens", "gather_tokens", "bipartite_match", "merge_tokens"]:
        assert f"graphred::{name}" in REGISTRY
    for name in ["view", "reshape", "_unsafe_view", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
                 "slice", "select", "alias", "detach", "sym_size", "_assert_scalar", "_assert_tensor_metadata"]:
        assert getattr(aten, name) in KNOWN_ZERO_COST, name
        assert lookup(getattr(aten, name)) is ZERO_COST


def test_kind_and_mode_are_checked():
    with pytest.raises(ValueError, match="kind"):
        REGISTRY[aten.mm].flops([(2, 3), (3, 4)], kind="everything")
    with pytest.raises(ValueError, match="mode"):
        REGISTRY[aten.mm].flops([(2, 3), (3, 4)], mode="causal")


# ---------------------------------------------------------------------------------------
# 2. formulas == torch's FlopCounterMode on real tensors
# ---------------------------------------------------------------------------------------


def _registry_flops(op, *args, kind="matmul", mode="full", **kwargs) -> int:
    """Registry count for one real call: tensors -> shapes, outputs from actually running the op."""
    out = op(*args, **kwargs)
    in_shapes = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    out_shapes = [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    to_shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else x  # noqa: E731
    a, kw = tree_map(to_shape, (args, kwargs))
    cost = lookup(op)
    assert cost is not None, op
    return int(cost.flops(in_shapes, out_shapes, a, kw, kind=kind, mode=mode))


def _torch_flops(fn, *args, **kwargs) -> int:
    with fc.FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


R = torch.randn


@pytest.mark.parametrize(
    "op,args,kwargs",
    [
        (aten.mm.default, (R(5, 7), R(7, 3)), {}),
        (aten.addmm.default, (R(3), R(5, 7), R(7, 3)), {}),
        (aten.bmm.default, (R(2, 5, 7), R(2, 7, 3)), {}),
        (aten.baddbmm.default, (R(2, 5, 3), R(2, 5, 7), R(2, 7, 3)), {}),
        (aten.matmul.default, (R(2, 1, 5, 7), R(3, 7, 4)), {}),
        (aten.matmul.default, (R(7), R(2, 7, 4)), {}),
        (aten.matmul.default, (R(4, 5, 7), R(7)), {}),
        (aten.linear.default, (R(2, 5, 7), R(3, 7), R(3)), {}),
        (aten.conv2d.default, (R(2, 4, 11, 9), R(6, 2, 3, 2), R(6), [2, 1], [1, 0], [1, 2], 2), {}),
        (aten.conv1d.default, (R(2, 3, 10), R(5, 3, 4)), {}),
        (aten.convolution.default, (R(2, 4, 8, 8), R(4, 2, 3, 3), None, [1, 1], [1, 1], [1, 1], True, [0, 0], 2), {}),
        (aten.conv_transpose2d.input, (R(2, 4, 5, 5), R(4, 3, 2, 2), R(3), [2, 2]), {}),
        (aten.einsum.default, ("bhqd,bhkd->bhqk", [R(2, 3, 4, 5), R(2, 3, 6, 5)]), {}),
        (aten.einsum.default, ("ij,jk,kl->il", [R(3, 4), R(4, 5), R(5, 6)]), {}),
        (aten.einsum.default, ("i,j->ij", [R(3), R(4)]), {}),
        (aten.scaled_dot_product_attention.default, (R(2, 3, 5, 8), R(2, 3, 7, 8), R(2, 3, 7, 4)), {}),
    ],
    ids=lambda x: str(x) if isinstance(x, torch._ops.OpOverload) else "",
)
def test_matmul_formulas_equal_flop_counter_mode(op, args, kwargs):
    # scaled_dot_product_attention with Dv != D runs the math path (bmm), which torch counts itself
    assert _registry_flops(op, *args, **kwargs) == _torch_flops(op, *args, **kwargs)


def test_cpu_sdpa_kernel_is_missing_from_torch_and_the_oracle_counts_it():
    q = k = v = R(2, 4, 6, 8)
    with fc.FlopCounterMode(display=False, custom_mapping={}) as counter:
        counter.flop_registry.pop(aten._scaled_dot_product_flash_attention_for_cpu, None)
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 0  # torch alone misses CPU attention
    done = install_cpu_sdpa_flop_formula()
    assert done["aten::_scaled_dot_product_flash_attention_for_cpu"] in ("registered", "present")
    assert install_cpu_sdpa_flop_formula() == {k: ("present" if v == "registered" else v) for k, v in done.items()}
    counts = flop_counts_executed(F.scaled_dot_product_attention, q, k, v)
    assert counts == {"aten._scaled_dot_product_flash_attention_for_cpu": 4 * 2 * 4 * 6 * 6 * 8}


@pytest.mark.parametrize(
    "qshape,kshape,kwargs",
    [
        ((2, 8, 5, 16), (2, 2, 7, 16), {"enable_gqa": True}),
        ((2, 8, 6, 16), (2, 2, 6, 16), {"enable_gqa": True, "is_causal": True}),
        ((1, 4, 5, 16), (1, 4, 9, 16), {"attn_mask": R(5, 9)}),
        ((1, 4, 9, 16), (1, 4, 9, 16), {"is_causal": True}),
    ],
)
def test_sdpa_formulas_equal_oracle_on_the_cpu_kernel(qshape, kshape, kwargs):
    q, k, v = R(*qshape), R(*kshape), R(*kshape)
    counts = flop_counts_executed(F.scaled_dot_product_attention, q, k, v, **kwargs)
    assert set(counts) == {"aten._scaled_dot_product_flash_attention_for_cpu"}  # the fused kernel ran
    oracle = sum(counts.values())
    # composite op, and the CPU kernel as the aten graph records it
    assert _registry_flops(aten.scaled_dot_product_attention.default, q, k, v, **kwargs) == oracle
    kw = dict(kwargs)
    kw.pop("enable_gqa", None)
    causal = kw.pop("is_causal", False)
    assert _registry_flops(aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v, 0.0, causal,
                           **kw) == oracle
    # GQA: counted with the query heads
    b, h, lq, d = qshape
    assert oracle == 4 * b * h * lq * kshape[2] * d


@pytest.mark.parametrize("packet", [aten._scaled_dot_product_efficient_attention,
                                    aten._scaled_dot_product_flash_attention,
                                    aten._scaled_dot_product_cudnn_attention])
@pytest.mark.parametrize("heads_kv", [8, 2])
def test_gpu_sdpa_formulas_equal_torch_registered_formula(packet, heads_kv):
    q, k, v = (2, 8, 5, 16), (2, heads_kv, 7, 16), (2, heads_kv, 7, 12)
    theirs = fc.flop_registry[packet](q, k, v, out_val=None)
    ours = REGISTRY[packet].flops([q, k, v], [], (q, k, v), kind="matmul")
    assert ours == theirs


def test_native_mha_fast_path_counted_by_oracle_and_registry():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = R(2, 5, 32)
    with torch.no_grad():
        counts = flop_counts_executed(mha, x, x, x)
    assert set(counts) == {"aten._native_multi_head_attention"}
    grad_path = count_flops_executed(mha, x, x, x)  # with grad: the composite path, all counted by torch
    assert counts["aten._native_multi_head_attention"] == grad_path
    ours = _registry_flops(aten._native_multi_head_attention.default, x, x, x, 32, 4, mha.in_proj_weight,
                           mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    assert ours == grad_path


# ---------------------------------------------------------------------------------------
# causal_executed
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lq,lk", [(1, 1), (4, 4), (3, 8), (8, 3), (7, 7)])
def test_causal_pairs_match_torch_masks(lq, lk):
    top_left = torch.ones(lq, lk, dtype=torch.bool).tril()  # F.scaled_dot_product_attention(is_causal=True)
    assert causal_pairs(lq, lk, "top_left") == int(top_left.sum())
    from torch.nn.attention.bias import causal_lower_right

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lq > lk: "will produce NaNs" -- rows with no key are the point
        bottom_right = causal_lower_right(lq, lk)._materialize()
    assert causal_pairs(lq, lk, "bottom_right") == int(bottom_right.sum())
    if lq <= lk:
        assert causal_pairs(lq, lk, "bottom_right") == lq * lk - lq * (lq - 1) // 2
    if lq == lk:
        assert causal_pairs(lq, lk) == causal_pairs(lq, lk, "bottom_right") == lq * (lq + 1) // 2


def test_causal_executed_mode_counts_unmasked_pairs_only():
    q = (2, 4, 9, 16)
    sdpa = REGISTRY[aten.scaled_dot_product_attention]
    causal_args = (q, q, q, None, 0.0, True)
    full = sdpa.flops([q, q, q], [q], causal_args, kind="matmul")
    executed = sdpa.flops([q, q, q], [q], causal_args, kind="matmul", mode="causal_executed")
    assert full == 4 * 2 * 4 * 9 * 9 * 16
    assert executed == 4 * 2 * 4 * (9 * 10 // 2) * 16
    # a non-causal call is the same in both modes
    plain = (q, q, q, None, 0.0, False)
    assert sdpa.flops([q] * 3, [q], plain, mode="causal_executed") == sdpa.flops([q] * 3, [q], plain)


# ---------------------------------------------------------------------------------------
# 3. count_graph on exported graphs == the oracle
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Patch-embedding conv, concat with text, pre-norm GQA causal SDPA and a GELU MLP."""

    def __init__(self, d=32, heads=4, kv_heads=2, patch=4):
        super().__init__()
        self.h, self.hk, self.dh = heads, kv_heads, d // heads
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.dh)
        self.o = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, pixels, text):
        x = torch.cat([self.patch(pixels).flatten(2).transpose(1, 2), text], dim=1)
        b, n, _ = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, n, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(y).view(b, n, 2, self.hk, self.dh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@pytest.fixture(scope="module")
def block_and_inputs():
    torch.manual_seed(0)
    return Block().eval(), (R(2, 3, 16, 16), R(2, 5, 32))


@pytest.fixture(scope="module")
def block_program(block_and_inputs):
    model, args = block_and_inputs
    return _export(model, args)


def test_count_graph_matches_oracle_on_exported_block(block_and_inputs, block_program):
    model, args = block_and_inputs
    oracle = count_flops_executed(model, *args)
    by_op = flop_counts_executed(model, *args)
    assert by_op.get("aten._scaled_dot_product_flash_attention_for_cpu", 0) > 0  # attention is in the oracle
    ours = count_graph(block_program.module(), kind="matmul")
    assert isinstance(ours, CostTotals) and ours.uncounted == []
    assert _rel_close(ours.flops, oracle), (ours.by_op(), by_op)
    # the same after decomposition to core aten (addmm/bmm/_safe_softmax ...)
    core = count_graph(block_program.run_decompositions().module(), kind="matmul")
    assert core.uncounted == []
    assert _rel_close(core.flops, oracle)
    # kind="all" adds the elementwise work, and bytes are counted
    everything = count_graph(block_program.module(), kind="all")
    assert everything.flops > ours.flops and everything.bytes > 0


def test_count_graph_matches_oracle_on_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = R(2, 6, 32)
    ep = _export(mha, (x, x, x))
    with torch.no_grad():
        oracle = count_flops_executed(mha, x, x, x)  # the fused fast path
    ours = count_graph(ep.module(), kind="matmul")
    assert ours.uncounted == []
    assert _rel_close(ours.flops, oracle)


def test_count_graph_symbolic_with_dynamic_shapes():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.fc2(F.silu(self.fc1(x)))

    model = MLP()
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = _export(model, (R(2, 7, 16),), dynamic_shapes=({1: seq},))
    totals = count_graph(ep.module(), kind="all")
    assert totals.flops.free_symbols and totals.uncounted == []
    (s,) = totals.flops.free_symbols
    for n in (7, 33):
        x = R(2, n, 16)
        assert int(count_graph(ep.module(), kind="matmul").flops.subs(s, n)) == count_flops_executed(model, x)
    # the same expression through shape_of on a static export
    static = _export(model, (R(2, 7, 16),)).module()
    L = sympy.Symbol("L", positive=True, integer=True)

    def shape_of(node: fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 3:
            return (v.shape[0], L, v.shape[2])
        return None

    sym = count_graph(static, shape_of=shape_of, kind="matmul").flops
    assert sympy.expand(sym - 2 * 2 * L * 16 * 64 * 2) == 0
    assert sympy.expand(count_graph(static, shape_of=shape_of).flops - totals.flops.subs(s, L)) == 0


def test_unknown_op_is_reported_not_zeroed():
    class M(nn.Module):
        def forward(self, x, w):
            return torch.lgamma(x @ w)

    x, w = R(3, 4), R(4, 5)
    ep = _export(M(), (x, w))
    totals = count_graph(ep.module())
    assert [u.op for u in totals.uncounted] == ["aten.lgamma.default"]
    assert totals.uncounted[0].name in {n.name for n in ep.graph.nodes}
    assert not totals.complete
    assert totals.flops == 2 * 3 * 4 * 5  # the matmul is still counted
    assert lookup(aten.lgamma.default) is None


def test_formula_failure_is_reported():
    g = fx.Graph()
    a = g.placeholder("a")
    a.meta["val"] = torch.empty(3, 4, 5, device="meta")
    mm = g.call_function(aten.mm.default, (a, a))  # a 3-D mm cannot be read by the mm formula
    mm.meta["val"] = torch.empty(3, 3, device="meta")
    g.output(mm)
    totals = count_graph(fx.GraphModule(nn.Module(), g))
    assert len(totals.uncounted) == 1 and totals.uncounted[0].reason.startswith("formula failed")


# ---------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------


def test_bytes_conventions():
    f32, i64 = torch.float32, torch.int64
    assert REGISTRY[aten.add].bytes([(4, 5), (4, 5)], [f32, f32], [(4, 5)], [f32]) == 3 * 20 * 4
    assert REGISTRY[aten.clone].bytes([(4, 5)], [torch.bfloat16], [(4, 5)], [torch.bfloat16]) == 2 * 20 * 2
    # a gather reads the index and the gathered rows only, not the whole table
    emb = REGISTRY[aten.embedding].bytes([(50000, 8), (2, 3)], [f32, i64], [(2, 3, 8)], [f32])
    assert emb == 6 * 8 + 2 * 48 * 4
    assert REGISTRY[aten.empty_like].bytes([(4, 5)], [f32], [(4, 5)], [f32]) == 0
    assert REGISTRY[aten.zeros].bytes([], [], [(4, 5)], [f32]) == 80

    class M(nn.Module):
        def forward(self, x):
            return x.view(2, 10).transpose(0, 1).contiguous()

    per_node = count_graph(_export(M(), (R(4, 5),)).module()).per_node
    ops = {c.op: c.bytes for c in per_node.values()}
    assert ops["aten.view.default"] == 0 and ops["aten.transpose.int"] == 0
    assert ops["aten.contiguous.default"] == 2 * 20 * 4


# ---------------------------------------------------------------------------------------
# graphred custom ops
# ---------------------------------------------------------------------------------------


def test_graphred_ops_registry_equals_oracle_and_fastv_is_an_upper_bound():
    gops = pytest.importorskip("graphred.ops")

    class Reduce(nn.Module):
        def forward(self, q, k, x, w):
            s = gops.attention_scores(q, k, w, None, 0.3)
            keep = gops.select_tokens(s, torch.ones_like(s, dtype=torch.bool), 3)
            y = gops.gather_tokens(x, keep, 1)
            kk, src, dst = gops.bipartite_match(y, torch.ones(y.shape[:2], dtype=torch.bool), 2)
            ym, _ = gops.merge_tokens(y, torch.ones(y.shape[:2]), src, dst)
            return gops.gather_tokens(ym, kk, 1)

    q, k, x = R(2, 4, 5, 8), R(2, 2, 10, 8), R(2, 10, 16)
    w = torch.ones(2, 5)
    model = Reduce()
    gm = _export(model, (q, k, x, w)).module()
    ours = count_graph(gm, kind="matmul")
    assert ours.uncounted == []
    assert int(ours.flops) == count_flops_executed(model, q, k, x, w)
    assert int(ours.flops) == (2 * 2 * 4 * 5 * 10 * 8 + 2 * 2 * 5 * 10) + 2 * 2 * 4 * 3 * 16
    assert count_graph(gm, kind="all").flops > ours.flops
    # FastV weights one query row: the kernel runs 1 row, the static count is an upper bound
    w1 = torch.zeros(2, 5)
    w1[:, -1] = 1
    assert count_flops_executed(model, q, k, x, w1) < int(ours.flops)


def test_submodules_of_run_once_higher_order_ops_are_counted():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            with torch.no_grad():  # exported as higher_order.wrap_with_set_grad_enabled(submodule)
                z = self.b(y)
            return y + z

    model, x = M().train(), R(3, 8)
    gm = _export(model, (x,)).module()
    assert any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)
    totals = count_graph(gm, kind="matmul")
    assert totals.uncounted == []
    assert int(totals.flops) == count_flops_executed(model, x) == 2 * 2 * 3 * 8 * 8
    assert any("/" in name for name in totals.per_node)
