"""The one rewrite pipeline: a :class:`~graphred.plans.Plan` lowers to passes, and the
:class:`~graphred.passes.infra.PassManager` runs them on a copy of the graph.

::

    plan ──lower──> [PumerPass | FastVPass | ToMePass per step] + ProportionalAttentionPass
                    + FillerMaskPass + PositionsOutputPass + CSEPass
                    (run_pipeline runs UnfoldKeySourcesPass first when a step reduces)
                                     │
    PassManager(passes, analyses=AnalysisManager) ── after each modifying pass: lint, recompile,
                                     │               meta["val"] check, drop analyses not preserved
    AnalysisManager: Provenance (token streams) -> Blocks (attention) -> Rewrite (RewriteState)

:func:`run_pipeline` runs it on a bare GraphModule and example inputs (what a compile backend holds);
:func:`graphred.passes.apply.apply_plan` runs it on a captured :class:`~graphred.program.Program`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from ..analysis.blocks import AttentionBlock, Blocks
from ..analysis.provenance import Provenance, TokenProvenance
from ..errors import PlanError
from ..fx_utils import META_KEY
from ..plans import FastVStep, Plan, PumerStep, ToMeStep, VictorStep
from .cse import CSEPass
from .fastv import FastVPass
from .fillers import FillerMaskPass
from .infra import AnalysisManager, GraphredPass, PassManager
from .positions_output import PositionsOutputPass
from .proportional_attention import ProportionalAttentionPass
from .registers import VictorPass
from .pumer import PumerPass
from .rewrite_state import Rewrite, RewriteState, StepPass
from .tome import ToMePass
from .unfold import UnfoldKeySourcesPass
from .token_axis import record_original_shapes

STEP_PASSES: dict[type, type[StepPass]] = {PumerStep: PumerPass, FastVStep: FastVPass, ToMeStep: ToMePass,
                                           VictorStep: VictorPass}
"""Plan step type -> the pass that carries it out."""


def lower(plan: Plan) -> list[GraphredPass]:
    """The passes that carry out ``plan``, in order: one per step that reduces (identity steps are
    dropped), then proportional attention, the positions output and the clean-up.

    >>> import graphred
    >>> lower(graphred.plans.tome(r=4) + graphred.plans.pumer(prune=0.5, merge=0))
    [ToMePass(tome:r=4), PumerPass(pumer:prune=0.5,merge=0), ProportionalAttentionPass, FillerMaskPass, PositionsOutputPass, CSEPass]
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a graphred.plans.Plan, got {type(plan).__name__}: build one with graphred.plans.pumer(...)")
    passes: list[GraphredPass] = []
    steps = plan.steps
    if any(isinstance(s, VictorStep) for s in steps):  # ToMe acts in the vision tower, upstream of the decoder
        steps = tuple(s for s in steps if isinstance(s, ToMeStep)) + tuple(s for s in steps if not isinstance(s, ToMeStep))
    for step in steps:
        if step.is_identity:
            continue
        cls = STEP_PASSES.get(type(step))
        if cls is None:
            raise PlanError(f"unknown plan step {step!r}: graphred lowers {', '.join(t.__name__ for t in STEP_PASSES)}")
        passes.append(cls(step))
    return passes + [ProportionalAttentionPass(), FillerMaskPass(), PositionsOutputPass(), CSEPass()]


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` made: the reduced graph module, the rewrite state (log, substitutions),
    the analysis manager (its cached analyses), the substitutions per original node, and whether the
    kept positions were appended to the outputs."""

    graph_module: fx.GraphModule
    state: RewriteState | None
    analyses: AnalysisManager
    provenance: TokenProvenance
    blocks: list[AttentionBlock]
    subs_at: dict[str, dict] = field(default_factory=dict)
    positions_output: bool = False

    @property
    def log(self) -> list[dict]:
        return list(self.state.log) if self.state is not None else []


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its parameters and buffers (and node
    ``meta`` values; graphred's own per-node records are copied, so the copy's never reach ``gm``)."""
    # the code generator holds the pytree specs: immutable, so shared (deep-copying a leaf spec re-creates it
    # through a deprecated constructor, which warned on every transform); the copy gets its own generator
    cg = gm.graph._codegen
    gm.graph._codegen = fx.graph.CodeGen()
    try:
        new_graph = copy.deepcopy(gm.graph)
    finally:
        gm.graph._codegen = cg
    new_graph._codegen = copy.copy(cg)
    new = fx.GraphModule(gm, new_graph, class_name=type(gm).__name__)
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(new, k, getattr(gm, k))
    for n_old, n_new in zip(gm.graph.nodes, new.graph.nodes):
        n_new.meta = dict(n_old.meta)
        if META_KEY in n_new.meta:
            n_new.meta[META_KEY] = dict(n_new.meta[META_KEY])
    return new


def run_pipeline(gm: fx.GraphModule, plan: Plan, example_inputs: tuple[tuple, dict], *,
                 value_inputs: tuple | None = None, model: str | None = None, check_meta: bool = True,
                 keep_all: bool = False) -> PipelineResult:
    """Apply ``plan`` to a copy of ``gm`` (``gm`` is never changed). ``example_inputs=(args, kwargs)``
    give the token layout (``value_inputs``: CPU copies when ``gm`` was captured on the meta device);
    ``model`` names the model in errors; ``check_meta`` re-propagates fake values after every pass
    (costly on large graphs). ``keep_all=True`` is a debug mode for tests: every reduction inserts its whole
    rewrite but keeps every token, so the outputs must equal ``gm``'s bit for bit.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])
    >>> program = graphred.capture(model, **inputs)
    >>> out = run_pipeline(program.graph_module, graphred.plans.fastv(layer=1, keep=0.5), program.example_inputs())
    >>> out.log[0]["op"], out.positions_output
    ('prune', True)
    """
    passes = lower(plan)
    new = copy_graph_module(gm)
    am = AnalysisManager()
    seed = Provenance(example_inputs, value_inputs=value_inputs)
    if any(isinstance(p, StepPass) for p in passes):
        # cross-attention keys folded with another dim (tiles in the batch): unfold them first; a modified graph
        # gets its provenance and blocks computed again below
        am.get(seed, new)
        PassManager([UnfoldKeySourcesPass()], analyses=am, check_meta=check_meta)(new)
    record_original_shapes(new)
    prov = am.get(seed, new)
    blocks = am.get(Blocks, new)
    am.get(Rewrite(model or type(gm).__name__, value_inputs or example_inputs, keep_all=keep_all), new)
    PassManager(passes, analyses=am, check_meta=check_meta)(new)
    new.graph.lint()
    new.recompile()
    state = am.peek(Rewrite, new)
    positions = any(isinstance(p, PositionsOutputPass) and p.added for p in passes)
    return PipelineResult(new, state, am, prov, blocks, subs_at(new, state) if state is not None else {}, positions)


def subs_at(gm: fx.GraphModule, rs: RewriteState) -> dict[str, dict]:
    """For every original node, the symbol substitution in effect where it runs (from ``rs.subs``)."""
    out: dict[str, dict] = {}
    current: dict = {}
    marks = {name: s for name, s in rs.subs}
    for n in gm.graph.nodes:
        if n.name in marks:
            s = marks[n.name]
            st = rs.prov.streams[s["stream"]]
            for mod, v in s.items():
                if mod == "stream":
                    continue
                sym = st.symbols.get(mod)
                if sym is not None:
                    current[sym] = sympy.Integer(v - st.offsets.get(mod, 0))
                else:  # a stream whose length is written in another's symbol (tiles of an image): solve for it
                    current.update(_solve_length(rs.prov, st, mod, v))
        if n.name in rs.original_names and current:
            out[n.name] = dict(current)
    return out


def _solve_length(prov: TokenProvenance, st, modality: str, count: int) -> dict:
    """``{symbol: value}`` making the symbolic length of ``st`` (a stream of ``modality`` tokens only, its length
    written in one symbol of the stream it derives from) equal ``count``; empty where that does not hold. The
    estimate checks the substituted expression against the reduced graph's count."""
    if st.sym_length is None or any(n for c in st.counts() for m, n in c.items() if m != modality):
        return {}
    free = sympy.sympify(st.sym_length).free_symbols - {prov.batch_symbol}
    if len(free) != 1:
        return {}
    s = free.pop()
    x = sympy.Symbol("x")  # (not an integer symbol: the solution may be a fraction, e.g. 2*n + 2 = 17)
    sol = sympy.solve(sympy.Eq(sympy.sympify(st.sym_length).subs(s, x), count), x)
    return {s: sol[0]} if len(sol) == 1 else {}


__all__ = ["STEP_PASSES", "PipelineResult", "copy_graph_module", "lower", "run_pipeline", "subs_at"]
