"""``graphred.analyze(program) -> Report``: where modalities meet, as a table and as JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..program import Program
from .blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, UNIMODAL_SELF, AttentionBlock, detect_blocks
from .provenance import TOKENS, TokenProvenance, UnknownOp


@dataclass
class Report:
    """What :func:`analyze` found. ``blocks`` lists every attention block in graph order.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
    >>> report = graphred.analyze(graphred.capture(model, **inputs))
    >>> report.cross_modal[0].kind
    'cross_modal_self'
    """

    model_class: str
    blocks: list[AttentionBlock]
    streams: list[dict[str, Any]]
    unknown_ops: list[UnknownOp]
    notes: list[str] = field(default_factory=list)
    provenance: TokenProvenance | None = field(default=None, repr=False)
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def cross_modal(self) -> list[AttentionBlock]:
        """Blocks where modalities meet (``cross_modal_self`` and ``cross_attention``)."""
        return [b for b in self.blocks if b.kind != UNIMODAL_SELF]

    def stacks(self) -> dict[str, list[AttentionBlock]]:
        out: dict[str, list[AttentionBlock]] = {}
        for b in self.blocks:
            out.setdefault(b.stack, []).append(b)
        return out

    @property
    def summary(self) -> str:
        n, c = len(self.blocks), len(self.cross_modal)
        if n == 0:
            return f"{self.model_class}: no attention found in the graph."
        kinds = {k: sum(1 for b in self.blocks if b.kind == k) for k in (CROSS_MODAL_SELF, CROSS_ATTENTION, UNIMODAL_SELF)}
        if c == 0:
            mods = sorted({m for b in self.blocks for m in b.query_modalities | b.key_modalities})
            return (f"{self.model_class}: {n} attention blocks, none cross-modal: every block attends within one "
                    f"modality ({', '.join(mods) or 'unknown'}); modalities never meet inside attention, so there is "
                    "no cross-modal block to prune at (ToMe merging inside a tower still applies).")
        return (f"{self.model_class}: {n} attention blocks, {c} cross-modal "
                f"({kinds[CROSS_MODAL_SELF]} cross_modal_self, {kinds[CROSS_ATTENTION]} cross_attention), "
                f"{kinds[UNIMODAL_SELF]} unimodal_self.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "summary": self.summary,
            "blocks": [b.to_dict() for b in self.blocks],
            "cross_modal": [b.module_path for b in self.cross_modal],
            "streams": self.streams,
            "symbols": dict(self.symbols),
            "unknown_ops": [{"node": u.node, "op": u.op, "module_path": u.module_path} for u in self.unknown_ops],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        rows = [("#", "module path", "kind", "queries", "keys", "tokens", "causal")]
        for b in self.blocks:
            tok = ", ".join(f"{k}={v}" for k, v in sorted(b.tokens.items()))
            rows.append((str(b.index), b.module_path or "<top>", b.kind, "+".join(sorted(b.query_modalities)) or "?",
                         "+".join(sorted(b.key_modalities)) or "?", tok, {True: "yes", False: "no", None: "?"}[b.causal]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [self.summary, ""]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.streams:
            lines.append("")
            lines.append("token streams:")
            for s in self.streams:
                lines.append(f"  stream {s['id']}: {s['length']} tokens = {s['symbolic']}  ({s['rule']} at {s['origin']}; per sample {s['per_sample']})")
        if self.unknown_ops:
            lines.append("")
            lines.append("ops without a provenance rule (propagation stopped there):")
            for u in self.unknown_ops:
                lines.append(f"  {u}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def analyze(program: Program) -> Report:
    """Token provenance and attention blocks of a captured program.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[-2])  # a dual encoder
    >>> report = graphred.analyze(graphred.capture(model, **inputs))
    >>> len(report.cross_modal)
    0
    """
    if not isinstance(program, Program):
        from ..errors import GraphredError

        raise GraphredError(
            f"graphred.analyze expects a graphred.Program, got {type(program).__name__}: "
            "capture the model first with graphred.capture(model, **inputs)."
        )
    prov = TokenProvenance(program.graph_module, program.example_inputs())
    blocks = detect_blocks(program.graph_module, prov)
    streams = []
    for s in prov.canonical_streams(TOKENS):
        streams.append({
            "id": s.id, "length": s.length, "symbolic": str(s.sym_length), "rule": s.rule, "origin": s.origin,
            "modalities": sorted(s.modalities()), "per_sample": s.counts(),
        })
    notes = list(program.notes)
    return Report(
        model_class=program.model_class, blocks=blocks, streams=streams, unknown_ops=list(prov.unknown),
        notes=notes, provenance=prov, symbols={str(k): int(v) for k, v in prov.symbol_values.items()},
    )
