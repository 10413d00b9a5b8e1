"""Clean-up after the reductions: common-subexpression elimination over the inserted side computations,
then dead-code elimination."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..fx_utils import SIDE, is_impure, recorded
from .infra import GraphredPass, PassResult
from .rewrite_state import RECORDS, Rewrite, RewriteState

aten = torch.ops.aten

_IMPURE = (aten.rand.default, aten.randn.default, aten.empty.memory_format)


class CSEPass(GraphredPass):
    """Separate bookkeeping paths (kept original positions, composed gather indices, modality codes) often
    compute the same index twice: merge identical calls among graphred's ops and the nodes marked ``SIDE``
    (all pure), keeping the reduction nodes the symbol substitutions name; then remove dead code (``dce``).
    Keeps the :class:`RewriteState` (its substitutions name kept nodes) and the per-node records; the
    provenance and blocks of the graph before the clean-up are dropped (dead original nodes go).

    >>> "Rewrite" in CSEPass.preserves, "Provenance" in CSEPass.preserves
    (True, False)
    """

    preserves = frozenset({Rewrite.name}) | RECORDS

    def call(self, gm: fx.GraphModule) -> PassResult:
        rs: RewriteState | None = self.analyses.peek(Rewrite, gm)
        keep = {name for name, _ in rs.subs} if rs is not None else set()
        removed = dedupe_inserted(gm, keep)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        return PassResult(gm, bool(removed) or len(gm.graph.nodes) != before)


def dedupe_inserted(gm: fx.GraphModule, keep: set[str]) -> int:
    """Common-subexpression elimination over graphred's ops and ``SIDE`` nodes, except those named in
    ``keep``. Returns the count removed."""
    seen: dict = {}
    removed = 0

    def norm(v):
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        if isinstance(v, torch.dtype | torch.device):
            return str(v)
        return v

    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.name in keep:
            continue
        ours = recorded(n, SIDE) or isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "graphred"
        if not ours or n.target in _IMPURE:
            continue
        try:
            key = (n.target, norm(n.args), tuple(sorted((k, norm(v)) for k, v in n.kwargs.items())))
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            removed += 1
    return removed
