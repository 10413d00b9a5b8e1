"""Reduction plans: what to reduce, where, by how much. Plans are data; they are validated at
construction and compose with ``+``.

>>> import graphred
>>> plan = graphred.plans.pumer(prune=0.3, merge=0.2) + graphred.plans.tome(r=4)
>>> print(plan)
pumer:prune=0.3,merge=0.2 + tome:r=4
>>> graphred.plans.parse_plan("fastv:layer=2,keep=0.5")
Plan(fastv:layer=2,keep=0.5)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .errors import PlanError

Ratio = Union[float, Sequence[float]]
LayerSelector = Union[None, int, str, Sequence[int], slice]

__all__ = ["Plan", "PumerStep", "FastVStep", "ToMeStep", "VictorStep", "pumer", "fastv", "tome", "prune", "victor",
           "parse_plan", "select_layers", "auto"]


def _check_ratio(name: str, value: Ratio, lo: float = 0.0, hi: float = 1.0, hi_open: bool = True) -> tuple[float, ...]:
    vals = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not vals:
        raise ValueError(f"{name} must be a ratio or a non-empty list of ratios, got {value!r}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number in [{lo}, {hi}), got {v!r}")
        if not (lo <= v < hi if hi_open else lo <= v <= hi):
            raise ValueError(f"{name}={v} is out of range: use {lo} <= {name} {'<' if hi_open else '<='} {hi}")
    return tuple(float(v) for v in vals)


def _check_layers(layers: LayerSelector) -> LayerSelector:
    if layers is None or isinstance(layers, slice):
        return layers
    if isinstance(layers, bool):
        raise ValueError(f"layers must be indices, a slice or a selector string, got {layers!r}")
    if isinstance(layers, int):
        if layers < 0:
            raise ValueError(f"layer index must be >= 0, got {layers}")
        return (layers,)
    if isinstance(layers, str):
        s = layers.strip()
        if s == "all" or s.startswith("from:") or s.startswith("every:"):
            try:
                if s != "all":
                    n = int(s.split(":", 1)[1])
                    if n < 0 or (s.startswith("every:") and n < 1):
                        raise ValueError
            except ValueError:
                raise ValueError(f"bad layer selector {layers!r}: use 'all', 'from:K' (K>=0) or 'every:K' (K>=1)") from None
            return s
        raise ValueError(f"bad layer selector {layers!r}: use indices, 'all', 'from:K' or 'every:K'")
    vals = tuple(layers)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in vals):
        raise ValueError(f"layers must be non-negative integers, got {layers!r}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"layers has duplicates: {layers!r}")
    return tuple(sorted(vals))


def select_layers(selector: LayerSelector, available: Sequence[int], default: LayerSelector = None) -> list[int]:
    """Resolve a selector against the layer indices a model has (e.g. its cross-modal layers).

    >>> select_layers("from:2", [0, 1, 2, 3])
    [2, 3]
    >>> select_layers("every:2", [0, 1, 2, 3, 4])
    [0, 2, 4]
    """
    sel = default if selector is None else selector
    avail = list(available)
    if sel is None or sel == "all":
        return avail
    if isinstance(sel, slice):
        return avail[sel]
    if isinstance(sel, str) and sel.startswith("from:"):
        k = int(sel.split(":")[1])
        return [a for a in avail if a >= k]
    if isinstance(sel, str) and sel.startswith("every:"):
        k = int(sel.split(":")[1])
        return [a for a in avail if (a - avail[0]) % k == 0] if avail else []
    return [a for a in sel]


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "/".join(_fmt(x) for x in v) if len(v) > 1 else _fmt(v[0])
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, slice):
        return f"from:{v.start or 0}"
    return str(v)


@dataclass(frozen=True)
class PumerStep:
    """PuMer: text-informed image pruning, then modality-aware merging, at cross-modal layers.

    ``prune``/``merge``/``merge_text`` are ratios (or one ratio per selected layer: a progressive
    schedule). ``layers`` selects among the layer indices of the cross-modal blocks.
    """

    prune: tuple[float, ...] = (0.0,)
    merge: tuple[float, ...] = (0.0,)
    merge_text: tuple[float, ...] = (0.0,)
    layers: LayerSelector = None
    scorer: str = "text"  # "text" (PuMer), or the baselines "random" and "norm" (text-agnostic)
    seed: int = 0
    proportional: bool = False  # add log(token size) to later attention logits (ToMe's proportional attention)
    renumber: bool = False  # kept tokens take positions 0..K-1 instead of keeping their original ones
    # "reference": merging as PuMer's released reducer (A/B split in score order, best-scored token protected,
    # sizes restart at 1 at each layer, merge count from the image length before pruning); "positional": A/B
    # split in sequence order, sizes carried across layers, merge count from the length after pruning
    variant: str = "reference"
    padded_queries: bool = False  # score with every text query, padding included (PuMer's released code)

    def ratio_at(self, which: str, i: int) -> float:
        vals = getattr(self, which)
        return vals[i] if len(vals) > 1 else vals[0]

    def spec(self) -> str:
        if self.scorer != "text":
            s = f"prune:ratio={_fmt(self.prune)},scorer={self.scorer}"
            if self.layers is not None:
                s += f",layers={_fmt(self.layers) if not isinstance(self.layers, tuple) else '/'.join(map(str, self.layers))}"
            return s + (f",seed={self.seed}" if self.scorer == "random" and self.seed else "")
        parts = [f"prune={_fmt(self.prune)}", f"merge={_fmt(self.merge)}"]
        if any(self.merge_text):
            parts.append(f"merge_text={_fmt(self.merge_text)}")
        if self.proportional:
            parts.append("proportional=true")
        if self.renumber:
            parts.append("renumber=true")
        if self.variant != "reference":
            parts.append(f"variant={self.variant}")
        if self.padded_queries:
            parts.append("padded_queries=true")
        if self.layers is not None:
            parts.append(f"layers={_fmt(self.layers) if not isinstance(self.layers, tuple) else '/'.join(map(str, self.layers))}")
        return "pumer:" + ",".join(parts)

    @property
    def is_identity(self) -> bool:
        return not any(self.prune) and not any(self.merge) and not any(self.merge_text)


@dataclass(frozen=True)
class FastVStep:
    """FastV: after decoder layer ``layer - 1``, keep the ``keep`` fraction of image tokens that
    the last token attends to most. Training-free; decoders only."""

    layer: int = 2
    keep: float = 0.5
    renumber: bool = False  # kept tokens take positions 0..K-1 instead of keeping their original ones

    def spec(self) -> str:
        return f"fastv:layer={self.layer},keep={_fmt(self.keep)}" + (",renumber=true" if self.renumber else "")

    @property
    def is_identity(self) -> bool:
        return self.keep >= 1.0


@dataclass(frozen=True)
class ToMeStep:
    """ToMe: merge ``r`` tokens per layer (bipartite soft matching) inside image-only attention
    stacks (vision towers), class tokens protected."""

    r: int = 8
    layers: LayerSelector = None
    proportional: bool = True  # add log(token size) to later attention logits, as ToMe does
    # "reference": after each merge the tokens take ToMe's output order ([unmerged A, merged B]) and the next
    # layer's alternating split runs over it; "positional": tokens keep their sequence order
    variant: str = "reference"

    def spec(self) -> str:
        s = f"tome:r={self.r}" + ("" if self.proportional else ",proportional=false")
        if self.variant != "reference":
            s += f",variant={self.variant}"
        if self.layers is not None:
            s += f",layers={_fmt(self.layers) if not isinstance(self.layers, tuple) else '/'.join(map(str, self.layers))}"
        return s

    @property
    def is_identity(self) -> bool:
        return self.r == 0


@dataclass(frozen=True)
class VictorStep:
    """Victor: ``registers`` learnable tokens inserted after each image's visual tokens in a decoder;
    decoder layers before ``layer`` summarise the image into them, and at decoder layer ``layer`` every
    visual token is dropped (residual stream, masks, rotary tables, later key/value caches).
    ``init`` is how the registers start: ``"pool"`` (the image tokens at the insertion point, averaged
    in ``registers`` contiguous groups, on the example inputs) or ``"random"``."""

    registers: int = 8
    layer: int = 2
    init: str = "pool"
    seed: int = 0

    def spec(self) -> str:
        s = f"victor:registers={self.registers},layer={self.layer}"
        if self.init != "pool":
            s += f",init={self.init}"
        return s + (f",seed={self.seed}" if self.seed else "")

    @property
    def is_identity(self) -> bool:
        return False  # adds tokens and drops the image: never the identity


Step = Union[PumerStep, FastVStep, ToMeStep, VictorStep]


@dataclass(frozen=True)
class Plan:
    """An ordered list of reduction steps. ``plan_a + plan_b`` composes."""

    steps: tuple = field(default_factory=tuple)

    def __add__(self, other: "Plan") -> "Plan":
        if not isinstance(other, Plan):
            return NotImplemented
        return Plan(self.steps + other.steps)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def is_identity(self) -> bool:
        return all(s.is_identity for s in self.steps)

    def __str__(self) -> str:
        return " + ".join(s.spec() for s in self.steps) or "identity"

    def __repr__(self) -> str:
        return f"Plan({self})"


VARIANTS = ("reference", "positional")


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose 'reference' (the authors' code) or 'positional'")
    return variant


def pumer(prune: Ratio = 0.3, merge: Ratio = 0.2, merge_text: Ratio = 0.0, layers: LayerSelector = None,
          proportional: bool = False, renumber: bool = False, variant: str = "reference",
          padded_queries: bool = False) -> Plan:
    """PuMer (Cao et al., 2023): text-informed image pruning + modality-aware merging.

    ``variant="reference"`` merges as PuMer's released reducer: the kept image tokens are split into the
    bipartite sets alternately in score order, the best-scored one is protected, token sizes restart at 1
    at each layer and the merge count is ``round(merge * N)`` with ``N`` the image tokens before pruning.
    ``variant="positional"`` splits in sequence order, carries sizes across layers and counts after pruning.
    Scores average the valid text queries; ``padded_queries=True`` also counts padded text rows, as the
    released code does (a bug there).

    >>> pumer(prune=0.3, merge=0.2, layers="from:1")
    Plan(pumer:prune=0.3,merge=0.2,layers=from:1)
    >>> pumer(prune=[0.1, 0.2, 0.3], layers=[2, 5, 8])   # a progressive schedule
    Plan(pumer:prune=0.1/0.2/0.3,merge=0,layers=2/5/8)
    >>> parse_plan("pumer:prune=0.3,merge=0.2,variant=positional")
    Plan(pumer:prune=0.3,merge=0.2,variant=positional)
    """
    p = _check_ratio("prune", prune)
    m = _check_ratio("merge", merge, hi=0.5, hi_open=False)
    mt = _check_ratio("merge_text", merge_text, hi=0.5, hi_open=False)
    lay = _check_layers(layers)
    for name, vals in (("prune", p), ("merge", m), ("merge_text", mt)):
        if len(vals) > 1 and not (isinstance(lay, tuple) and len(lay) == len(vals)):
            raise ValueError(f"a per-layer schedule for {name} ({len(vals)} values) needs layers= with as many indices")
    return Plan((PumerStep(p, m, mt, lay, proportional=bool(proportional), renumber=bool(renumber),
                           variant=_check_variant(variant), padded_queries=bool(padded_queries)),))


SCORERS = ("random", "norm")


def prune(ratio: Ratio = 0.3, layers: LayerSelector = None, scorer: str = "random", seed: int = 0) -> Plan:
    """Baseline image-token pruning at PuMer's places with a text-agnostic score: ``"random"`` (a
    fixed, seeded random priority per position) or ``"norm"`` (the L2 norm of each token's hidden
    state). A text-informed method should beat both at equal kept tokens.

    >>> prune(ratio=0.5, scorer="norm", layers=[2])
    Plan(prune:ratio=0.5,scorer=norm,layers=2)
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: choose from {', '.join(SCORERS)} (or use pumer(...) for text-informed)")
    p = _check_ratio("ratio", ratio)
    lay = _check_layers(layers)
    if len(p) > 1 and not (isinstance(lay, tuple) and len(lay) == len(p)):
        raise ValueError(f"a per-layer schedule for ratio ({len(p)} values) needs layers= with as many indices")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return Plan((PumerStep(p, (0.0,), (0.0,), lay, scorer, seed),))


def fastv(layer: int = 2, keep: float = 0.5, renumber: bool = False) -> Plan:
    """FastV (Chen et al., 2024): prune image tokens after decoder layer ``layer-1``.

    >>> fastv(layer=2, keep=0.25)
    Plan(fastv:layer=2,keep=0.25)
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"fastv layer must be an integer >= 1 (scores come from layer-1), got {layer!r}")
    (k,) = _check_ratio("keep", keep, lo=0.0, hi=1.0, hi_open=False)
    if k <= 0.0:
        raise ValueError("fastv keep must be > 0: at least one image token is kept")
    return Plan((FastVStep(layer, k, bool(renumber)),))


def tome(r: int = 8, layers: LayerSelector = None, proportional: bool = True, variant: str = "reference") -> Plan:
    """ToMe (Bolya et al., 2023): merge ``r`` tokens per layer in vision towers.

    ``variant="reference"``: after each merge the tokens take ToMe's output order (class tokens, unmerged A
    tokens, merged B tokens) and the next layer splits that order, as ToMe's code does;
    ``variant="positional"`` keeps the tokens in sequence order.

    >>> tome(r=4)
    Plan(tome:r=4)
    >>> parse_plan("tome:r=4,variant=positional")
    Plan(tome:r=4,variant=positional)
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"tome r must be a non-negative integer, got {r!r}")
    return Plan((ToMeStep(r, _check_layers(layers), bool(proportional), _check_variant(variant)),))


VICTOR_INITS = ("pool", "random")


def victor(registers: int = 8, layer: int = 2, init: str = "pool", seed: int = 0) -> Plan:
    """Victor (Wen et al., 2024): ``registers`` learnable tokens after each image in a decoder VLM; the
    decoder layers before ``layer`` summarise the image into them, then every visual token is dropped.
    The registers are ``nn.Parameter``s of the transformed module (train them with :func:`graphred.train`).

    >>> victor(registers=8, layer=2)
    Plan(victor:registers=8,layer=2)
    >>> victor(registers=4, layer=1, init="random") + tome(r=2)
    Plan(victor:registers=4,layer=1,init=random + tome:r=2)
    """
    if isinstance(registers, bool) or not isinstance(registers, int) or registers < 1:
        raise PlanError(f"victor registers must be an integer >= 1 (the paper uses 8), got {registers!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise PlanError(f"victor layer must be an integer >= 1 (decoder layers 0..layer-1 summarise the image into "
                        f"the registers before the image is dropped), got {layer!r}")
    if init not in VICTOR_INITS:
        raise PlanError(f"victor init must be one of {', '.join(VICTOR_INITS)}, got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"victor seed must be an integer, got {seed!r}")
    return Plan((VictorStep(registers, layer, init, seed),))


_BUILDERS = {"pumer": pumer, "fastv": fastv, "tome": tome, "prune": prune, "victor": victor}


def parse_plan(text: str) -> Plan:
    """Parse the CLI form: ``pumer:prune=0.3,merge=0.2``, ``fastv:layer=2,keep=0.5``, ``tome:r=8``,
    several joined with ``+``. Lists use ``/`` (``prune=0.1/0.2,layers=2/5``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty plan: use e.g. 'pumer:prune=0.3,merge=0.2' or 'fastv:layer=2,keep=0.5'")
    plan = Plan()
    for part in text.split("+"):
        part = part.strip()
        name, _, args = part.partition(":")
        name = name.strip().lower()
        if name not in _BUILDERS:
            raise ValueError(f"unknown plan {name!r} in {text!r}: choose from {', '.join(sorted(_BUILDERS))}")
        kwargs = {}
        for kv in filter(None, (a.strip() for a in args.split(","))):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"bad plan argument {kv!r} in {text!r}: use key=value")
            key = k.strip()
            if key in kwargs:
                raise ValueError(f"{key} given twice in {part!r} of {text!r}: give each argument once")
            kwargs[key] = _parse_value(key, v.strip())
        try:
            plan = plan + _BUILDERS[name](**kwargs)
        except TypeError as e:
            raise ValueError(f"bad arguments for {name} in {text!r}: {e}") from None
    return plan


def _parse_value(key: str, v: str):
    if key in ("scorer", "init", "variant"):
        return v
    if key == "layers" and (v in ("all",) or v.startswith("from") or v.startswith("every")):
        return v.replace("from", "from:").replace("every", "every:").replace("::", ":") if ":" not in v else v
    if "/" in v:
        items = [_parse_value(key, x) for x in v.split("/")]
        return items
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"bad value {v!r} for {key}") from None

