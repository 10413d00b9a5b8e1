"""Victor as graph passes: learnable register tokens after each image, then the image dropped.

:class:`InsertRegisters` lengthens a decoder's token stream where it enters the first decoder
layer: ``registers`` slots after every image (a run of image tokens), filled from an
``nn.Parameter`` of the graph module (a ``get_attr`` node). The token-axis rewrite
(:func:`graphred.passes.token_axis.reduce_stream`) carries the longer stream through the graph:
every full-length operand met on the way (attention masks, rotary cos/sin, position ids, labels)
is gathered with the *original* position each slot stands for. A register stands for its image's
last token: it takes that token's position id and rotary angle (so the text after the image keeps
its original positions, and the registers all sit at one position, as a summary of the image), its
mask row (it sees what the last image token sees), and its label. Mask *columns* of registers are
then made causal in the new order: a register is seen by the registers after it and by the later
text, never by the image or by earlier registers.

:class:`DropImageTokens` removes every image token where the stream enters decoder layer ``k``
(the same gather the other reductions use, with a keep index of all text and register slots);
masks, rotary tables and the key/value caches of later layers follow.

Nothing here knows a model: the decoder is the causal cross-modal stack the analysis found, the
image tokens are read from the stream's run-time modality codes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from .. import ops as _ops  # noqa: F401  (registers graphred:: ops)
from ..analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, AttentionBlock
from ..analysis.provenance import CODE, IMAGE, REGISTER
from ..errors import PlanError
from ..plans import VictorStep
from ..fx_utils import SIDE, call_with_val, node_shape, record
from .infra import GraphredPass
from .rewrite_state import RewriteState, StepPass
from .reduce import graph_device, layer_input
from .placeholders import only_shrunk
from .token_axis import reduce_stream

aten = torch.ops.aten
gr = torch.ops.graphred

__all__ = ["InsertRegisters", "DropImageTokens", "VictorPass", "REGISTER_PARAM", "decoder_of"]

REGISTER_PARAM = "graphred_registers"  # parameter name prefix on the transformed graph module


_COMPARE = {"le", "lt", "ge", "gt"}


def _packet_name(n: fx.Node) -> str:
    t = n.target
    return getattr(getattr(t, "_overloadpacket", None), "__name__", "") if n.op == "call_function" else ""


def _from_arange(n: fx.Node, limit: int = 12) -> bool:
    todo, seen = [n], set()
    while todo and len(seen) < limit * 4:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        if _packet_name(a) == "arange":
            return True
        todo.extend(a.all_input_nodes)
    return False


def _decoder_like(gm: fx.GraphModule, block: AttentionBlock) -> bool:
    """Causal, or its mask is built by comparing two position ranges (``k <= q``: a causal order,
    possibly relaxed over a prefix, as in prefix-LM decoders). A mask built from the padding alone
    (every query sees the same keys) is an encoder's."""
    if block.causal:
        return True
    if block.mask is None:
        return False
    nodes = {n.name: n for n in gm.graph.nodes}
    todo, seen = [nodes[block.mask]], set()
    while todo and len(seen) < 400:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _packet_name(n) in _COMPARE and n.target.__name__.endswith("Tensor") and \
                all(isinstance(a, fx.Node) and _from_arange(a) for a in n.args[:2]):
            return True
        todo.extend(n.all_input_nodes)
    return False


def decoder_of(step_name: str, model_class: str, blocks: list[AttentionBlock], gm: fx.GraphModule) -> tuple[str, list[AttentionBlock]]:
    """``(stack, blocks by layer)`` of the decoder where image and text tokens share one causal stream,
    or a :class:`PlanError` saying what the model has instead."""
    cm = [b for b in blocks if b.kind == CROSS_MODAL_SELF]
    if not cm:
        kinds = sorted({b.stack for b in blocks})
        what = ("cross-attention layers (text queries read image keys; the image is never in the text's token "
                "stream)" if any(b.kind == CROSS_ATTENTION for b in blocks) else
                f"only separate attention stacks ({', '.join(kinds) or 'none'}): a dual encoder, image and text never "
                "share a sequence")
        raise PlanError(f"{step_name}: {model_class} has no decoder holding image and text tokens in one sequence; it has "
                        f"{what}. Victor needs a decoder VLM (image tokens written into the text's token stream); use graphred.plans.tome(...) or pumer(...).")
    by_stack: dict[str, list[AttentionBlock]] = {}
    for b in cm:
        by_stack.setdefault(b.stack, []).append(b)
    stack = max(by_stack, key=lambda s: len(by_stack[s]))
    layers: dict[int, AttentionBlock] = {}
    for b in by_stack[stack]:
        layers.setdefault(b.layer_index, b)
    ordered = [layers[i] for i in sorted(layers)]
    if not any(_decoder_like(gm, b) for b in ordered):
        raise PlanError(f"{step_name}: {model_class} has no decoder: its cross-modal stack {stack} ({len(ordered)} layers) "
                        "attends both ways over image and text (an encoder), so there is no causal order in which "
                        "registers after the image summarise it. Use graphred.plans.pumer(...) or tome(...).")
    return stack, ordered


def _fake_of(gm: fx.GraphModule, t: torch.Tensor):
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
    return mode.from_tensor(t, static_shapes=True)


def _image_runs(codes: torch.Tensor) -> list[int]:
    """Images (maximal runs of image tokens) per sample of ``codes`` ``[B, L]``."""
    is_img = codes == CODE[IMAGE]
    nxt = torch.cat([is_img[:, 1:], torch.zeros_like(is_img[:, :1])], 1)
    return (is_img & ~nxt).sum(1).tolist()


class _Stop(Exception):
    pass


def _value_at(gm: fx.GraphModule, node_name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The value of ``node_name`` when ``gm`` runs on the inputs (the run stops there); None when the
    inputs hold no values (a program captured on the meta device) or the run fails."""
    got = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == node_name:
                got["value"] = out
                raise _Stop()
            return out

    try:
        flat = pytree.tree_leaves(gm.graph._codegen.process_inputs(tuple(args), dict(kwargs)))
        with torch.no_grad():
            Grab(gm).run(*flat)
    except Exception:
        pass
    v = got.get("value")
    return v if isinstance(v, torch.Tensor) and v.device.type != "meta" else None


def initial_registers(x: torch.Tensor | None, codes: torch.Tensor, n: int, init: str, seed: int, dim: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Registers ``[n, dim]``. ``pool``: each image's tokens at the insertion point split into ``n``
    contiguous groups and averaged (over groups' members, then over images and samples), so register
    ``j`` starts as a summary of the ``j``-th part of an image. ``random``: normal noise at the scale
    of the stream's values (std 0.02 without example values)."""
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        return (torch.randn(n, dim, generator=gen) * 0.02).to(dtype)
    xf = x.detach().float().cpu()
    if init == "random":
        return (torch.randn(n, dim, generator=gen) * xf.std()).to(dtype)
    codes = codes.expand(xf.shape[0], -1)
    pooled = []
    for b in range(xf.shape[0]):
        is_img = (codes[b] == CODE[IMAGE]).tolist()
        runs, start = [], None
        for i, v in enumerate(is_img + [False]):
            if v and start is None:
                start = i
            elif not v and start is not None:
                runs.append((start, i))
                start = None
        for s, e in runs:
            groups = torch.tensor_split(xf[b, s:e], n) if e - s >= n else [xf[b, s:e]] * n
            pooled.append(torch.stack([g.mean(0) for g in groups]))
    regs = torch.stack(pooled).mean(0)
    # tiny noise: registers sharing one position must not start identical where groups coincide
    return (regs + 1e-3 * regs.std() * torch.randn(regs.shape, generator=gen)).to(dtype)


class InsertRegisters(GraphredPass):
    """Insert ``step.registers`` learnable tokens after each image of the decoder stream (see module doc).

    Works on the shared rewrite context of :func:`graphred.passes.apply.apply_plan` (stream states,
    modality codes, log). Records ``ctx.victor`` = the layout nodes for :class:`DropImageTokens`.
    """

    in_place = True

    def __init__(self, ctx, step: VictorStep):
        super().__init__()
        self.ctx, self.step = ctx, step

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx, step = self.ctx, self.step
        prov, graph = ctx.prov, gm.graph
        stack, layers = decoder_of("victor", ctx.model, ctx.blocks, gm)
        n_layers = len(layers)
        if step.layer >= n_layers:
            raise PlanError(f"victor: layer={step.layer} is beyond the decoder: {stack} has {n_layers} layers "
                            f"(0..{n_layers - 1}), and the image is dropped where layer k begins, so choose "
                            f"1 <= layer <= {n_layers - 1}")
        sid = prov.find(layers[0].query_stream) if layers[0].query_stream is not None else None
        if sid is None:
            raise PlanError(f"victor: the token axis of {layers[0].module_path} is unknown (see the analysis report)")
        st = ctx.state(sid, ragged=True, step_name="victor")
        ragged = ctx.ragged.get(st.stream)
        # (image placeholders shrunk to what a reduced vision tower writes are fine: the images are shorter)
        if not only_shrunk(st):
            raise PlanError("victor: the decoder's tokens were already reduced by an earlier step (pumer/fastv); victor "
                            "drops every image token itself, so use it alone on the decoder (vision-tower steps such "
                            "as tome(...) may come before it)")
        info = prov.streams[st.stream]
        n_img = ctx.counts[st.stream][IMAGE]
        per_runs = _image_runs(info.codes) if info.codes is not None else []
        runs = set(per_runs)
        per_img = ragged[IMAGE] if ragged is not None else [n_img] * max(len(per_runs), 1)
        if n_img == 0 or not runs or 0 in runs or 0 in per_img:
            raise PlanError(f"victor: the decoder stream of {stack} holds no image tokens in some sample (image tokens "
                            f"per sample: {per_img}); Victor summarises images")
        # uneven batch (different image counts or sizes): every sample gets the slots of the most images, filler
        # slots where it has fewer; at the drop a sample with more image tokens keeps the difference as fillers
        uneven = ragged is not None or len(runs) != 1
        if uneven and st.filler is not None:
            raise PlanError("victor: the uneven batch's decoder stream already holds filler slots from an earlier step; "
                            "use victor alone on it")
        images = max(runs)
        first = layers[0].layer_index
        point = layer_input(gm, prov, stack, first, st.stream)
        dims = [d for d, s in prov.axes(point) if prov.find(s.id) == st.stream]
        pshape = node_shape(point)
        if not dims or len(pshape) != 3 or dims[0] != 1:
            raise PlanError(f"victor: the input of {stack}.{first} ({point.name}, shape {pshape}) is not a [batch, "
                            "tokens, features] sequence; registers are inserted into the decoder's embeddings")
        B, L, D = pshape
        N = step.registers
        dtype = point.meta["val"].dtype
        # initial values (on the example inputs, before the graph changes)
        args, kwargs = ctx.example_inputs or ((), {})
        x0 = _value_at(gm, point.name, args, kwargs) if ctx.example_inputs is not None else None
        codes0 = info.codes
        if x0 is not None and st.abs_index is not None:  # the stream's codes at its current numbering
            at = _value_at(gm, st.abs_index.name, args, kwargs)
            codes0 = codes0.expand(at.shape[0], -1).gather(1, at.cpu()) if at is not None else None
            x0 = x0 if codes0 is not None else None
        init = initial_registers(x0, codes0, N, step.init, step.seed, D, dtype)
        k = sum(1 for name, _ in gm.named_parameters(recurse=False) if name.startswith(REGISTER_PARAM))
        pname = f"{REGISTER_PARAM}_{k}" if k else REGISTER_PARAM
        dev = graph_device(gm)
        gm.register_parameter(pname, nn.Parameter(init.to(dev)))
        with graph.inserting_after(point):
            codes = ctx.codes(st.stream, point.next)
        L_new = L + N * images
        K = L_new - min(per_img)
        fill_ins = fill_keep = None
        with graph.inserting_before(codes.next):
            if uneven:
                layout = call_with_val(graph, gr.register_layout_ragged.default, (codes, N, L_new, K))
                src_i, orig_i, is_reg, fill_ins, keep_i, fill_keep = (
                    call_with_val(graph, operator.getitem, (layout, i)) for i in range(6))
            else:
                layout = call_with_val(graph, gr.register_layout.default, (codes, N, images, n_img))
                src_i, orig_i, is_reg, keep_i = (call_with_val(graph, operator.getitem, (layout, i)) for i in range(4))
            reg = graph.get_attr(pname)
            reg.meta["val"] = _fake_of(gm, getattr(gm, pname))
        for n in (layout, src_i, orig_i, is_reg, keep_i, fill_ins, fill_keep):
            if n is not None:
                record(n, SIDE, True)
        Bc = node_shape(orig_i)[0]
        if Bc != B and Bc != 1:
            raise PlanError(f"victor: modality codes have batch {Bc}, the stream batch {B}")

        def with_registers(x: fx.Node) -> fx.Node:  # [x, registers]: the rows the insertion gathers from
            r = call_with_val(graph, aten.unsqueeze.default, (reg, 0))
            r = call_with_val(graph, aten.expand.default, (r, [B, N, D]))
            return call_with_val(graph, aten.cat.default, ([x, r], 1))

        g = reduce_stream(gm, prov, st, point, orig_i, L_new, transform=with_registers, gather_index=src_i,
                          pass_name=f"victor (insert registers) at {stack}.{first}",
                          inputs_ready=reg)
        self._causal_register_columns(gm, orig_i, is_reg, L_new)
        ctx.counts[st.stream][REGISTER] = ctx.counts[st.stream].get(REGISTER, 0) + N * images
        ctx.last_point[st.stream] = g
        fillers = None
        if uneven:  # the missing registers' slots of samples with fewer images: no attention sees them
            per_images = per_runs if len(per_runs) == len(per_img) else [images] * len(per_img)
            fillers = [N * (images - m) for m in per_images]
            st.filler = fill_ins
            ctx.filler_marks.setdefault(st.stream, []).append((g, fill_ins))
            ctx.fillers[st.stream] = list(fillers)
        ctx.victor = {"stream": st.stream, "is_register": is_reg, "keep": keep_i, "stack": stack,
                      "images": images, "registers": N, "param": pname, "point": g,
                      "uneven": uneven, "per_image_tokens": list(per_img), "filler_keep": fill_keep, "fillers": fillers}
        ctx.log.append({"step": "victor", "op": "insert_registers", "block": f"{stack}.{first}", "registers": N,
                        "images": images, "length_after": L_new, "parameter": pname})
        ctx.subs.append((g.name, {"stream": st.stream, REGISTER: N * images}))
        return PassResult(gm, True)

    def _causal_register_columns(self, gm: fx.GraphModule, orig_i: fx.Node, is_reg: fx.Node, L_new: int) -> None:
        """Every token-by-token table the rewrite gathered on both axes (attention masks, additive
        biases) gets its register columns made causal in the new order."""
        graph = gm.graph
        targets = []
        def by_orig(x) -> bool:  # gathered with orig_i, or with an earlier reduction's index composed with it
            if not (isinstance(x, fx.Node) and x.target is gr.gather_tokens.default):
                return False
            ix = x.args[1]
            return ix is orig_i or (isinstance(ix, fx.Node) and ix.target is gr.gather_tokens.default and ix.args[1] is orig_i)

        for n in list(graph.nodes):
            if n.op != "call_function" or not by_orig(n) or not by_orig(n.args[0]):
                continue
            s = node_shape(n)
            if s is None or len(s) < 2 or s[-1] != L_new or s[-2] != L_new:
                continue
            targets.append(n)
        for m in targets:
            s = node_shape(m)
            val = m.meta["val"]
            users = list(m.users)
            with graph.inserting_before(m.next):
                dev = val.device
                pos = call_with_val(graph, aten.arange.default, (L_new,), {"dtype": torch.long, "device": dev})
                q = call_with_val(graph, aten.view.default, (pos, [L_new, 1]))
                later = call_with_val(graph, aten.lt.Tensor, (q, pos))  # [L, L]: key after query
                rk = call_with_val(graph, aten.unsqueeze.default, (is_reg, 1))  # [Bc, 1, L]
                bad = call_with_val(graph, aten.logical_and.default, (rk, later))  # [Bc, L, L]
                Bc = node_shape(bad)[0]
                view = [Bc] + [1] * (len(s) - 3) + [L_new, L_new] if len(s) >= 3 else [L_new, L_new]
                if len(s) < 3:
                    bad = call_with_val(graph, aten.select.int, (bad, 0, 0))
                elif s[0] not in (1, Bc) and Bc != 1:
                    raise PlanError(f"victor: the attention mask {m.name} has batch {s[0]}, the token stream {Bc}")
                else:
                    bad = call_with_val(graph, aten.view.default, (bad, view))
                if val.dtype == torch.bool:
                    fixed = call_with_val(graph, aten.logical_and.default, (m, call_with_val(graph, aten.logical_not.default, (bad,))))
                else:
                    fixed = call_with_val(graph, aten.masked_fill.Scalar, (m, bad, torch.finfo(val.dtype).min
                                                                   if val.is_floating_point() else 0))
            for n in (pos, q, later, rk, bad, fixed):
                record(n, SIDE, True)
            for u in users:
                u.replace_input_with(m, fixed)


class DropImageTokens(GraphredPass):
    """Drop every image token where the decoder stream enters layer ``step.layer`` (after
    :class:`InsertRegisters`): residual stream, masks, rotary tables and later key/value caches."""

    in_place = True

    def __init__(self, ctx, step: VictorStep):
        super().__init__()
        self.ctx, self.step = ctx, step

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx, step = self.ctx, self.step
        v = ctx.victor
        if v is None:
            raise PlanError("victor: DropImageTokens runs after InsertRegisters")
        st = ctx.state(v["stream"], ragged=True, step_name="victor")
        point = layer_input(gm, ctx.prov, v["stack"], step.layer, st.stream)
        ctx.check_order(st.stream, point, "victor")
        n_img = ctx.counts[st.stream][IMAGE]
        per = v["per_image_tokens"]
        new_len = st.length - (min(per) if v["uneven"] else n_img)
        g = reduce_stream(gm, ctx.prov, st, point, v["keep"], new_len,
                          pass_name=f"victor (drop image tokens) at {v['stack']}.{step.layer}")
        ctx.last_point[st.stream] = g
        ctx.counts[st.stream][IMAGE] = 0
        if v["uneven"]:  # a sample with more image tokens than the fewest keeps the difference as filler slots
            st.filler = v["filler_keep"]
            ctx.filler_marks.setdefault(st.stream, []).append((g, st.filler))
            ctx.fillers[st.stream] = [f + p - min(per) for f, p in zip(v["fillers"], per)]
            ctx.counts[st.stream][IMAGE] = per[0] - min(per)  # the first sample's image slots left as fillers
        entry = {"step": "victor", "op": "drop_image", "block": f"{v['stack']}.{step.layer}",
                 "image_before": list(per) if v["uneven"] else n_img, "image_after": 0, "length_after": new_len}
        if v["uneven"]:
            entry["fillers_after"] = list(ctx.fillers[st.stream])
        ctx.log.append(entry)
        ctx.subs.append((g.name, {"stream": st.stream, IMAGE: ctx.counts[st.stream][IMAGE]}))
        return PassResult(gm, True)


class VictorPass(StepPass):
    """One :class:`~graphred.plans.VictorStep`: :class:`InsertRegisters` where the decoder stream enters its
    first layer, then :class:`DropImageTokens` at the input of layer ``step.layer``.

    >>> import graphred
    >>> from graphred.passes.pipeline import lower
    >>> lower(graphred.plans.victor(registers=8, layer=1))[0]
    VictorPass(victor:registers=8,layer=1)
    """

    hint = "Victor needs a decoder VLM whose image tokens sit in the decoder's token stream."

    def apply(self, gm: fx.GraphModule, rs: RewriteState) -> None:
        if rs.keep_all:
            raise PlanError("victor: keep_all (keep every token) does not apply: Victor adds register tokens, so its "
                            "outputs cannot equal the unreduced model's; test it against its eager reference instead")
        InsertRegisters(rs, self.step)(gm)
        DropImageTokens(rs, self.step)(gm)
