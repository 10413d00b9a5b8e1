"""Append the kept original token positions of the reduced stream to the graph's outputs."""
from __future__ import annotations

import torch.fx as fx
from torch.utils import _pytree as pytree

from .infra import GraphredPass, PassResult
from .rewrite_state import Rewrite, RewriteState, StepPass


class PositionsOutputPass(GraphredPass):
    """After the reductions, the graph also returns ``[B, K]`` original positions of the tokens kept in
    the last reduced stream (the output spec gains a leaf; :class:`graphred.reduced_module.ReducedModule`
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
        idx = None
        for st in rs.states.values():
            if st.abs_index is not None:
                idx = st.abs_index
        cg = gm.graph._codegen
        info = getattr(cg, "pytree_info", None)
        if idx is None or info is None or info.out_spec is None:
            return PassResult(gm, False)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        out.args = (tuple(flat) + (idx,),)
        cg.pytree_info = info._replace(out_spec=pytree.treespec_tuple([info.out_spec, pytree.treespec_leaf()]))
        self.added = True
        return PassResult(gm, True)
