"""Partial evaluation reads the bookkeeping of a reduced graph without running a layer: graphred's
selection ops get a stand-in for their scores / metric / features, and the counts come out as in a real run."""
import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

import graphred
from graphred.analysis.evaluate import DATA_ARGS, partial_evaluate
from graphred.passes.apply import apply_plan

HEAVY = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.addmm.default, torch.ops.aten.matmul.default, torch.ops.aten.convolution.default,
         torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _op_name(n: fx.Node) -> str:
    return getattr(getattr(n.target, "_schema", None), "name", "")


def test_bookkeeping_of_a_multi_layer_pumer_graph_runs_no_layer(zoo_program, zoo_model):
    prog = zoo_program("llava")
    _, kwargs = zoo_model("llava")
    applied = apply_plan(prog, graphred.plans.pumer(prune=0.3, merge=0.2, layers="all"))  # layers 0 and 1
    gm = applied.graph_module
    scorers = [n for n in gm.graph.nodes if _op_name(n) == "graphred::attention_scores"]
    matchers = [n for n in gm.graph.nodes if _op_name(n) == "graphred::bipartite_match"]
    assert len(scorers) == 2 and len(matchers) == 2
    wanted = [n.args[2] for n in scorers] + [n.args[1] for n in matchers]  # query weights, merge candidates
    flat = [kwargs[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
    with _Ops() as ops:
        got = partial_evaluate(gm, flat, wanted)
    assert set(got) == set(wanted)
    assert not HEAVY & set(ops.seen), sorted(str(f) for f in HEAVY & set(ops.seen))
    assert not any(str(f).startswith("graphred.attention_scores") for f in ops.seen)

    # the same nodes in a real run of the reduced graph: counts per sample agree
    real = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n in wanted:
                real[n] = v
            return v

    with torch.no_grad():
        Rec(gm).run(*flat)
    for w in wanted:
        assert got[w].shape == real[w].shape, w
        assert torch.equal((got[w] != 0).sum(-1), (real[w] != 0).sum(-1)), w


def test_data_args_name_real_arguments_of_graphred_ops():
    for op, names in DATA_ARGS.items():
        ns, name = op.split("::")
        schema = getattr(getattr(torch.ops, ns), name).default._schema
        assert set(names) <= {a.name for a in schema.arguments}, (op, names)
