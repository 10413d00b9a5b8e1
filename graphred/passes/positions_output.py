"""Append the kept original token positions of the reduced stream to the graph's outputs."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..fx_utils import call_with_val
from .infra import GraphredPass, PassResult
from .rewrite_state import Rewrite, RewriteState, StepPass


class PositionsOutputPass(GraphredPass):
    """After the reductions, the graph also returns ``[B, K]`` original positions of the tokens kept in
    the last reduced stream, -1 on the filler slots of an uneven batch (the output spec gains a leaf; :class:`graphred.reduced_module.ReducedModule`
    splits it off). Does nothing when no stream was reduced or the graph has no pytree output spec.

    >>> PositionsOutputPass.preserves >= {"Rewrite"}
    True
    """

    preserves = StepPass.preserves

    def __init__(self):
        super().__init__()
        self.added = False  # whether the last run appended the positions

    def call(self, gm: fx.GraphModule) -> PassResult:
        rs: RewriteState = self.analyses.get(Rewrite, gm)
        idx = filler = None
        for st in rs.states.values():
            if st.abs_index is not None:
                idx, filler = st.abs_index, st.filler
        cg = gm.graph._codegen
        info = getattr(cg, "pytree_info", None)
        if idx is None or info is None or info.out_spec is None:
            return PassResult(gm, False)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        if filler is not None:  # filler slots of an uneven batch hold no kept token: -1
            with gm.graph.inserting_before(out):
                idx = call_with_val(gm.graph, torch.ops.aten.where.ScalarSelf, (filler, -1, idx))
        flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        out.args = (tuple(flat) + (idx,),)
        cg.pytree_info = info._replace(out_spec=pytree.treespec_tuple([info.out_spec, pytree.treespec_leaf()]))
        self.added = True
        return PassResult(gm, True)
