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


def test_a_graph_captured_on_an_accelerator_is_evaluated_on_the_cpu(zoo_program, zoo_model):
    """A capture on CUDA records ``device='cuda:0'`` in its arange/to/full calls and holds CUDA inputs and
    weights; partial evaluation maps all of that to the CPU and gives the CPU capture's mask values. Here
    the CPU capture's device arguments are rewritten to CUDA (this machine has none: any op left on CUDA
    fails, so the masks would be missing)."""
    from graphred.analysis.attention import find_attention

    prog = zoo_program("llava")
    _, kwargs = zoo_model("llava")
    gm = prog.graph_module
    swapped = fx.GraphModule(gm, gm.graph.__deepcopy__())  # shares the weights, not the graph
    cuda = torch.device("cuda", 0)

    def to_cuda(a):
        if isinstance(a, torch.device):
            return cuda
        if isinstance(a, (list, tuple)):
            return type(a)(to_cuda(x) for x in a)
        return a

    moved = 0
    for n in swapped.graph.nodes:
        args, kw = to_cuda(n.args), {k: to_cuda(v) for k, v in n.kwargs.items()}
        moved += (args != n.args) + (kw != n.kwargs)
        n.args, n.kwargs = args, kw
    assert moved > 5
    flat = [kwargs[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
    masks = list(dict.fromkeys(a["mask"] for a in find_attention(gm) if a["mask"] is not None))
    masks_swapped = list(dict.fromkeys(a["mask"] for a in find_attention(swapped) if a["mask"] is not None))
    assert len(masks) == len(masks_swapped) >= 1
    want = partial_evaluate(gm, flat, masks)
    got = partial_evaluate(swapped, flat, masks_swapped)
    assert len(got) == len(want) == len(masks)
    for m, ms in zip(masks, masks_swapped):
        assert got[ms].device.type == "cpu" and torch.equal(got[ms], want[m])
