"""What the reduction passes of one plan share while they rewrite one graph.

A plan lowers to several passes (:mod:`graphred.passes.pipeline`); each reduces token streams, and a
later one must know what the earlier ones did: which original positions each stream still holds, the
merged token sizes, the current per-modality counts, which symbol values hold from which node on.
That state is :class:`RewriteState`, a cached result of the :class:`Rewrite` analysis in the pass
manager's :class:`~graphred.passes.infra.AnalysisManager`. It is the only mutable result there:
passes update it, every reduction pass preserves it, and the pipeline reads it at the end (the log,
the symbol substitutions). Per-node records go under ``node.meta["graphred"]``
(:data:`graphred.fx_utils.META_KEY`): :data:`~graphred.fx_utils.SIDE` on side computations,
:data:`~graphred.fx_utils.MADE_BY` on every inserted node, :data:`~graphred.fx_utils.ORIG_SHAPE`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..analysis.blocks import AttentionBlock, Blocks
from ..analysis.provenance import CODE, IMAGE, REGISTER, TEXT, Provenance, TokenProvenance
from ..errors import PlanError
from ..fx_utils import (
    MADE_BY, ORIG_SHAPE, SIDE, call_with_val, fake_like, graph_device, module_path, node_map, node_order, node_shape,
    record, recorded,
)
from .infra import Analysis, AnalysisManager, GraphredPass, PassResult
from .reduce import emit_codes, emit_valid
from .token_axis import StreamState

aten = torch.ops.aten
gr = torch.ops.graphred

RECORDS = frozenset({ORIG_SHAPE, SIDE, MADE_BY})
"""Per-node records every graphred pass keeps (they describe nodes, not analyses of the graph)."""


class RewriteState:
    """The reductions made so far on one graph, shared by the passes of one plan.

    * ``states``: stream id -> :class:`~graphred.passes.token_axis.StreamState` (original positions
      of the current tokens, token sizes after merging, current length);
    * ``counts``: stream id -> current tokens per modality;
    * ``subs``: ``(name of the reduction node, {"stream": id, modality: count})`` in the order made: from
      that node on, the stream's modality count symbol takes that value (the estimate reads them);
    * ``log``: one dict per reduction (step, op, block, counts before/after);
    * ``size_marks``: stream id -> ``[(reduction node, token sizes after it)]`` (proportional attention);
    * ``proportional``: streams whose later attention adds ``log(size)`` to its key logits;
    * ``layer_chain``: gather indices applied at the layer being reduced, in order (a merge after a
      prune at one layer follows them to reach the layer's keys);
    * ``last_point``: stream id -> its latest reduction node (steps must act in graph order);
    * ``cuts``: ``(stack, layer)`` -> the step that cut the sequence at that layer's input (FastV);
    * ``ragged``, ``fillers``, ``filler_marks``: uneven batches (samples with different image counts): per-sample
      counts of real tokens, filler slots per sample, and the ``[B, L]`` filler flags in effect from each reduction
      node on (the filler masking pass keeps every later attention off the filler slots).
    """

    def __init__(self, gm: fx.GraphModule, prov: TokenProvenance, blocks: list[AttentionBlock], model: str = "the model",
                 example_inputs: tuple[tuple, dict] | None = None, keep_all: bool = False):
        self.gm, self.prov, self.blocks, self.model = gm, prov, blocks, model
        # debug mode: every reduction inserts its full rewrite (scores, selection, matching, gathers, merges,
        # mask/rotary/cache follow-ups) but keeps every token, so outputs must equal the unreduced graph's
        self.keep_all = keep_all
        self.example_inputs = example_inputs  # (args, kwargs) with values: passes that read run-time values (Victor's init)
        self.victor: dict | None = None  # Victor's register layout, from InsertRegisters to DropImageTokens
        self.step: str | None = None  # the spec of the step being applied (errors name it)
        self.states: dict[int, StreamState] = {}
        self.codes_cache: dict = {}
        self.counts: dict[int, dict[str, int]] = {}
        self.subs: list[tuple[str, dict]] = []
        self.log: list[dict] = []
        self.original_names = {n.name for n in gm.graph.nodes}
        self.layer_chain: list[fx.Node] = []
        self.size_marks: dict[int, list[tuple[fx.Node, fx.Node]]] = {}
        self.proportional: set[int] = set()
        self.valid0: dict[int, fx.Node] = {}  # stream -> key validity [B, L] at the original numbering
        self.last_point: dict[int, fx.Node] = {}
        self.cuts: dict[tuple[str, int], str] = {}
        # uneven batches: stream id -> {modality: per-sample count of real tokens}; the filler slots each sample
        # holds; (reduction node, [B, L] filler flags after it, or None) in the order made
        self.ragged: dict[int, dict[str, list[int]]] = {}
        self.fillers: dict[int, list[int]] = {}
        self.filler_marks: dict[int, list[tuple[fx.Node, fx.Node | None]]] = {}
        self._names: dict[str, fx.Node] = {}

    def node(self, name: str) -> fx.Node:
        """The node called ``name`` (original nodes keep their names through the rewrite)."""
        n = self._names.get(name)
        if n is None or n.graph is not self.gm.graph:
            self._names = node_map(self.gm)
            n = self._names[name]
        return n

    def attentions_after(self, sid: int, marks: list, order: dict):
        """``(block, attention node, last mark before it)`` for every attention whose keys are on stream ``sid``
        and that comes after at least one of ``marks`` (``(node, value)`` pairs, any order)."""
        marks = sorted(marks, key=lambda m: order[m[0]])
        for b in self.blocks:
            if b.key_stream is None or self.prov.find(b.key_stream) != sid:
                continue
            att = self.node(b.node)
            live = [m for m in marks if order[m[0]] < order[att]]
            if live:
                yield b, att, live[-1]

    def check_order(self, sid: int, point: fx.Node, step_name: str) -> None:
        """Steps are applied in the order given; each must act later in the graph than the previous
        reductions of the same stream."""
        last = self.last_point.get(self.prov.find(sid))
        if last is not None:
            order = node_order(self.gm)
            if order[point] < order[last]:
                raise PlanError(f"{step_name}: it acts earlier in the graph than a step listed before it on the same "
                                "tokens; list the plan's steps in graph order (vision-tower steps such as tome(...) "
                                "before steps at later layers)")

    def state(self, sid: int, ragged: bool = False, step_name: str | None = None) -> StreamState:
        """The stream's rewrite state, created (with its per-modality counts) on first use. Samples with
        different per-modality counts (multi-image prompts, per-sample image sizes) are allowed only to a
        caller that keeps per-sample counts (``ragged=True``: it pads the batch with filler slots); others get
        a :class:`PlanError`."""
        sid = self.prov.find(sid)
        if sid not in self.states:
            st = self.prov.streams[sid]
            self.states[sid] = StreamState(sid, st.length, st.length, kept_prefix=_leading_fixed(st),
                                           kept_suffix=_trailing_fixed(st), on_scatter=self._shrink_placeholders)
            counts = st.counts()
            per, per_sample = {}, {}
            for m in (IMAGE, TEXT, REGISTER):
                vals = [c.get(m, 0) for c in counts]
                per_sample[m] = vals
                # uneven samples: the count the stream's symbols take is the first sample's (the provenance
                # analysis reads it there); each reduction then subtracts the slots it removes
                per[m] = vals[0] if vals else 0
            self.counts[sid] = per
            if any(len(set(v)) > 1 for v in per_sample.values()):
                self.ragged[sid] = per_sample
                self.fillers[sid] = [0] * len(counts)
        if sid in self.ragged and not ragged:
            st = self.prov.streams[sid]
            vals = sorted(set(self.ragged[sid][IMAGE]))
            raise PlanError(
                f"{step_name or self.step or 'the plan'}: samples hold different numbers of image tokens ({vals}) in the "
                "sequence at "
                f"{st.origin} (module {st_module(self.gm, st.origin)}); this step keeps one count for every sample. "
                "PuMer and FastV keep per-sample counts on such batches; or batch samples with equal image counts")
        return self.states[sid]

    def _shrink_placeholders(self, gm, scatter, rows0, rows1, pass_name) -> bool:
        from .placeholders import shrink_placeholders  # (it imports the token-axis rewrite, as this module does)

        return shrink_placeholders(self, gm, scatter, rows0, rows1, pass_name)

    def codes(self, sid: int, before: fx.Node) -> fx.Node:
        """Current-level modality codes of the stream, inserted before ``before``."""
        st = self.state(sid, ragged=True)
        graph = self.gm.graph
        with graph.inserting_before(before):
            c = emit_codes(self.gm, self.prov, st.stream, self.codes_cache)
        # the cache holds original-length codes; bring them to the current numbering
        if st.abs_index is not None:
            with graph.inserting_before(before):
                rows = node_shape(st.abs_index)[0]
                if node_shape(c)[0] != rows:
                    c = call_with_val(graph, aten.expand.default, (c, [rows, node_shape(c)[1]]))
                c = call_with_val(graph, gr.gather_tokens.default, (c, st.abs_index, 1))
        return c

    def valid(self, sid: int, mask: fx.Node | None, length: int, rows: int, before: fx.Node) -> fx.Node:
        """``[B, L]`` key validity at the current numbering. Read from the attention mask once, while the
        stream is still at its original numbering, then gathered (a reduce over an ``[B, 1, L, L]`` mask
        per step would cost O(L²) each time)."""
        st = self.state(sid, ragged=True)
        graph = self.gm.graph
        cached = self.valid0.get(st.stream)
        if cached is None and st.abs_index is None:
            with graph.inserting_before(before):
                cached = emit_valid(graph, mask, length, rows)
            record(cached, SIDE, True)
            self.valid0[st.stream] = cached
            return cached
        if cached is None:  # the first step on this stream came after other reductions
            with graph.inserting_before(before):
                return emit_valid(graph, mask, length, rows)
        if st.abs_index is None:
            return cached
        with graph.inserting_before(before):
            return call_with_val(graph, gr.gather_tokens.default, (cached, st.abs_index, 1))

    def special(self, sid: int, before: fx.Node) -> fx.Node | None:
        """``[1|B, L]`` bool at the current numbering: the stream's learned (protected) tokens, or None."""
        st = self.prov.streams[self.prov.find(sid)]
        if st.special is None or not bool(st.special.any()):
            return None
        name = f"_graphred_special_{st.id}"
        if not hasattr(self.gm, name):
            self.gm.register_buffer(name, st.special.view(1, -1).clone().to(graph_device(self.gm)), persistent=False)
        graph = self.gm.graph
        with graph.inserting_before(before):
            node = graph.get_attr(name)
            node.meta["val"] = fake_like(self.gm, getattr(self.gm, name))
            s = self.states[self.prov.find(sid)]
            if s.abs_index is not None:
                node = call_with_val(graph, gr.gather_tokens.default, (node, s.abs_index, 1))
        return node


def st_module(gm: fx.GraphModule, name: str) -> str:
    """The module path of node ``name`` (``<top>`` for the model's own forward)."""
    n = node_map(gm).get(name)
    return (module_path(n) if n is not None else "") or "<top>"


def _leading_fixed(st) -> int:
    """Leading positions image-token reductions never drop: protected (learned) tokens, or text before
    the first image token in every sample."""
    if st.special is not None and bool(st.special[:1].all()):
        n = 0
        while n < len(st.special) and bool(st.special[n]):
            n += 1
        return n
    return _run_of_text(st.codes, from_end=False)


def _trailing_fixed(st) -> int:
    """Trailing positions that are text in every sample (image-token reductions keep them last)."""
    return _run_of_text(st.codes, from_end=True)


def _run_of_text(codes, from_end: bool) -> int:
    if codes is None:
        return 0
    text = (codes == CODE[TEXT]).all(0)
    if from_end:
        text = text.flip(0)
    n = 0
    while n < len(text) and bool(text[n]):
        n += 1
    return n


class Rewrite(Analysis):
    """The :class:`RewriteState` of a graph: empty when first requested, then filled by the reduction
    passes (the one mutable result in the manager; it records what passes did, it reads no graph
    structure beyond :class:`Provenance` and :class:`Blocks`). ``model`` names the model in errors."""

    def __init__(self, model: str = "the model", example_inputs: tuple[tuple, dict] | None = None,
                 keep_all: bool = False):
        self.model, self.example_inputs, self.keep_all = model, example_inputs, keep_all

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> RewriteState:
        return RewriteState(gm, am.get(Provenance, gm), am.get(Blocks, gm), self.model, self.example_inputs,
                            self.keep_all)


class StepPass(GraphredPass):
    """Base of the passes that carry out one plan step: requires :class:`Provenance` in the manager,
    reads and updates the :class:`RewriteState`, stamps every node it inserts with
    ``MADE_BY = step.spec()``, and turns a failure that is not a :class:`PlanError` into one that
    names the step and the model. Subclasses implement :meth:`apply` and return whether they reduced."""

    preserves: ClassVar[frozenset[str]] = frozenset({Provenance.name, Blocks.name, Rewrite.name}) | RECORDS
    hint: ClassVar[str] = "Try other layers or ratios, or report the node named above."

    def __init__(self, step: Any):
        super().__init__()
        self.step = step

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.step.spec()})"

    def requires(self, graph_module: fx.GraphModule) -> None:
        from ..errors import PreconditionError

        if self.analyses.peek(Provenance, graph_module) is None:
            raise PreconditionError(
                f"{self.name} ({self.step.spec()}) needs the token provenance of the graph in its analysis manager; "
                "run it through graphred.passes.pipeline.run_pipeline, or seed the manager with "
                "am.get(Provenance(example_inputs), gm) first", pass_name=self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        rs: RewriteState = self.analyses.get(Rewrite, gm)
        before, logged = set(gm.graph.nodes), len(rs.log)
        rs.step = self.step.spec()
        try:
            self.apply(gm, rs)
        except PlanError:
            raise
        except Exception as e:  # a rewrite that cannot be done is the plan's error, said in its terms
            first = str(e).splitlines()[0] if str(e) else ""  # the whole message stays on the chained error
            raise PlanError(f"{self.step.spec()}: the rewrite of {rs.model} failed: {type(e).__name__}: {first}. "
                            f"{self.hint}", node=getattr(e, "node", None),
                            module_path=getattr(e, "module_path", None)) from e
        _check_keys_match_values(gm, self.step.spec())
        spec = self.step.spec()
        for n in gm.graph.nodes:
            if n not in before and recorded(n, MADE_BY) is None:
                record(n, MADE_BY, spec)
        return PassResult(gm, len(rs.log) > logged)

    def apply(self, gm: fx.GraphModule, rs: RewriteState) -> None:
        raise NotImplementedError


def _check_keys_match_values(gm: fx.GraphModule, spec: str) -> None:
    """Every attention's keys and values hold as many tokens after a rewrite. A cut placed on a path that feeds
    the keys only (keys and values computed once and split apart before the layers that read them) would
    shorten the keys and leave the values: the fused kernel does not check, and reads past the values it was
    meant to get. Raised as the plan's error instead."""
    from ..analysis.attention import find_attention

    for att in find_attention(gm):
        ks, vs = node_shape(att["k"]), node_shape(att["v"])
        if ks is None or vs is None or len(ks) < 2 or len(vs) < 2:
            continue
        # (unfused: the scores' matmul takes the keys transposed, unless the scores are transposed after it)
        n_keys = ks[-2] if att["fused"] or att["transposed"] else ks[-1]
        if n_keys != vs[-2]:
            raise PlanError(
                f"{spec}: after the rewrite the attention at node {att['node'].name} reads {n_keys} keys but "
                f"{vs[-2]} values: the cut reached its keys without its values (they come apart before the layers "
                "that read them). Reduce at another layer, or where one tensor feeds both.",
                node=att["node"].name, module_path=module_path(att["node"]))
