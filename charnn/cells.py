"""charnn's own recurrent stack, for the options the fused library kernels lack.

:class:`CustomRecurrent` is a drop-in for ``nn.LSTM``/``nn.GRU``/``nn.RNN``
(``batch_first=True``): ``forward(x, state) -> (out, state)``, the same
parameter names, shapes and gate order (LSTM: input, forget, cell, output;
GRU: reset, update, new), so ``model.init_recurrent`` applies unchanged and
library weights load into it. It adds

* steeper gates, ``sigmoid(slope * a)`` for every LSTM/GRU gate
  (``--gate-slope``; the Passage library used 3.75), and
* layer normalisation (Ba et al., 2016; ``--layer-norm``) of the input and
  recurrent projections (the whole gate vector) and, for the LSTM, of the cell
  before its output ``tanh``.

Speed: the input projection of a whole chunk is one matrix multiply (plus one
layer norm); only the recurrent part runs step by step. Without layer norm the
LSTM and GRU use a hand-written backward pass (truncated BPTT) whose per-step
work is a few small ops and whose weight gradients are one large matrix
multiply; with layer norm (and for the plain RNN) autograd runs through the
step loop. The loops are compiled with TorchScript once per process (no
recompiles per sequence length or batch size); ``benchmarks/tricks.py``
measures them against eager Python, a ``torch.compile``'d step, and the fused
library kernels, which charnn uses whenever the slope is 1 and layer norm is
off. The loops always run in float32: under bf16/fp16 autocast the input
projection uses the low precision and the recurrence stays exact.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# -- the per-step loops with autograd (layer norm, plain RNN) ---------------------------------------
# ``xp`` is the input projection of the whole chunk, time-major (time, batch, gates*hidden), holding
# every bias that can be added outside the loop. ``ln_g``/``ln_b`` normalise the recurrent
# projection when ``use_ln``; ``lnc_g``/``lnc_b`` normalise the LSTM cell.

def _lstm_loop(xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, scale: Tensor, use_ln: bool,
               ln_g: Tensor, ln_b: Tensor, lnc_g: Tensor, lnc_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    w_t = w_hh.t()
    hidden = h.size(1)
    outs: List[Tensor] = []
    for x_t in xp.unbind(0):  # unbind: one gradient buffer for all steps, not one per step
        rec = torch.mm(h, w_t)
        if use_ln:
            rec = F.layer_norm(rec, [4 * hidden], ln_g, ln_b)
        gates = x_t + rec
        if scale.numel() > 0:
            gates = gates * scale  # the gate slope on the i, f, o blocks, 1 on the cell input
        i, f, g, o = gates.chunk(4, 1)
        i = torch.sigmoid(i)
        f = torch.sigmoid(f)
        o = torch.sigmoid(o)
        g = torch.tanh(g)
        c = torch.addcmul(f * c, i, g)
        cc = F.layer_norm(c, [hidden], lnc_g, lnc_b) if use_ln else c
        h = o * torch.tanh(cc)
        outs.append(h)
    return torch.stack(outs), h, c


def _gru_loop(xp: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor, slope: float, use_ln: bool,
              ln_g: Tensor, ln_b: Tensor) -> Tuple[Tensor, Tensor]:
    w_t = w_hh.t()
    hidden = h.size(1)
    outs: List[Tensor] = []
    for x_t in xp.unbind(0):  # unbind: one gradient buffer for all steps, not one per step
        if use_ln:
            rec = F.layer_norm(torch.mm(h, w_t), [3 * hidden], ln_g, ln_b) + b_hh
        else:
            rec = torch.addmm(b_hh, h, w_t)
        xr, xz, xn = x_t.chunk(3, 1)
        hr, hz, hn = rec.chunk(3, 1)
        if slope != 1.0:
            r = torch.sigmoid((xr + hr) * slope)
            z = torch.sigmoid((xz + hz) * slope)
        else:
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
        n = torch.tanh(torch.addcmul(xn, r, hn))
        h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


def _rnn_loop(xp: Tensor, h: Tensor, w_hh: Tensor, relu: bool, use_ln: bool,
              ln_g: Tensor, ln_b: Tensor) -> Tuple[Tensor, Tensor]:
    w_t = w_hh.t()
    hidden = h.size(1)
    outs: List[Tensor] = []
    for x_t in xp.unbind(0):  # unbind: one gradient buffer for all steps, not one per step
        rec = torch.mm(h, w_t)
        if use_ln:
            rec = F.layer_norm(rec, [hidden], ln_g, ln_b)
        a = x_t + rec
        h = torch.relu(a) if relu else torch.tanh(a)
        outs.append(h)
    return torch.stack(outs), h


# -- hand-written BPTT for the LSTM and GRU without layer norm (time-major tensors) ----------------
# Autograd through a step loop records ~20 small ops per step. Here the forward loop also computes,
# per step and on small cache-resident tensors, the coefficients that make each backward step a
# handful of ops; the weight gradients are left to one large matrix multiply after the loop.
# (Precomputing the coefficients for the whole chunk at once is slower on the CPU: every
# chunk-sized temporary is a fresh allocation paid in page faults.)

def _lstm_fwd(xp: Tensor, h: Tensor, c: Tensor, w_t: Tensor, scale: Tensor, keep: bool
              ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """``xp`` (T, B, 4H) holds both biases. Returns outputs (T, B, H), h, c and, when ``keep``,
    per step: p (B, 4H), k (B, H) and the forget gate f (B, H) for :func:`_lstm_bwd`."""
    hidden = h.size(1)
    outs: List[Tensor] = []
    ps: List[Tensor] = []
    ks: List[Tensor] = []
    fs: List[Tensor] = []
    scaled = scale.numel() > 0
    for x_t in xp.unbind(0):
        a = torch.addmm(x_t, h, w_t)
        if scaled:
            a = a * scale
        sg = torch.sigmoid(a)
        g = torch.tanh(a[:, 2 * hidden:3 * hidden])
        c_prev = c
        c = torch.addcmul(sg[:, hidden:2 * hidden] * c, sg[:, :hidden], g)
        tc = torch.tanh(c)
        h = sg[:, 3 * hidden:] * tc
        outs.append(h)
        if keep:
            d = sg * (1 - sg)  # sigmoid'(a) (times the slope); the cell input's block is tanh'
            if scaled:
                d = d * scale
            d[:, 2 * hidden:3 * hidden] = 1 - g * g
            # d(pre-activation) = [dc, dc, dc, dh] * p, with p = [g, c_prev, i, tanh(c)] * d
            ps.append(torch.cat([g, c_prev, sg[:, :hidden], tc], 1) * d)
            ks.append(sg[:, 3 * hidden:] * (1 - tc * tc))  # dc += dh * k
            fs.append(sg[:, hidden:2 * hidden])
    return torch.stack(outs), h, c, ps, ks, fs


def _lstm_bwd(d_out: Tensor, dh: Tensor, dc: Tensor, w: Tensor, ps: List[Tensor], ks: List[Tensor],
              fs: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the gate pre-activations (T, B, 4H) and of h_0, c_0."""
    das: List[Tensor] = []
    for t in range(d_out.size(0) - 1, -1, -1):
        dh = dh + d_out[t]
        dc = torch.addcmul(dc, dh, ks[t])
        da = torch.cat([dc, dc, dc, dh], 1) * ps[t]
        das.append(da)
        dc = dc * fs[t]
        dh = torch.mm(da, w)
    das.reverse()
    return torch.stack(das), dh, dc


def _gru_fwd(xp: Tensor, h: Tensor, w_t: Tensor, b_hh: Tensor, slope: float, keep: bool
             ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """``xp`` (T, B, 3H) holds b_ih. Returns outputs (T, B, H), h and, when ``keep``, per step:
    q (B, 3H), the update gate z (B, H) and dn (B, H) for :func:`_gru_bwd`."""
    hidden = h.size(1)
    outs: List[Tensor] = []
    qs: List[Tensor] = []
    zs: List[Tensor] = []
    dns: List[Tensor] = []
    for x_t in xp.unbind(0):
        rec = torch.addmm(b_hh, h, w_t)
        a = x_t[:, :2 * hidden] + rec[:, :2 * hidden]
        if slope != 1.0:
            a = a * slope
        rz = torch.sigmoid(a)
        r, z = rz[:, :hidden], rz[:, hidden:]
        hn = rec[:, 2 * hidden:]
        n = torch.tanh(torch.addcmul(x_t[:, 2 * hidden:], r, hn))
        if keep:
            d = rz * (1 - rz)
            if slope != 1.0:
                d = d * slope
            dn = (1 - z) * (1 - n * n)  # d(pre-activation of n) per dh
            # d(recurrent projection) = [dh, dh, dh] * q: reset, update, the new gate's recurrent part
            qs.append(torch.cat([dn * hn * d[:, :hidden], (h - n) * d[:, hidden:], dn * r], 1))
            zs.append(z)
            dns.append(dn)
        h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h, qs, zs, dns


def _gru_bwd(d_out: Tensor, dh: Tensor, w: Tensor, qs: List[Tensor], zs: List[Tensor], dns: List[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the input projection (T, B, 3H), of the recurrent projection (T, B, 3H), and of h_0."""
    hidden = dh.size(1)
    drecs: List[Tensor] = []
    dxps: List[Tensor] = []
    for t in range(d_out.size(0) - 1, -1, -1):
        dh = dh + d_out[t]
        drec = torch.cat([dh, dh, dh], 1) * qs[t]
        drecs.append(drec)
        dxps.append(torch.cat([drec[:, :2 * hidden], dh * dns[t]], 1))
        dh = torch.addmm(dh * zs[t], drec, w)
    drecs.reverse()
    dxps.reverse()
    return torch.stack(dxps), torch.stack(drecs), dh


_LOOPS = {"lstm": _lstm_loop, "gru": _gru_loop, "rnn": _rnn_loop, "lstm_fwd": _lstm_fwd, "lstm_bwd": _lstm_bwd,
          "gru_fwd": _gru_fwd, "gru_bwd": _gru_bwd}
_SCRIPTED: dict = {}


def _loop(name: str, scripted: bool = True):
    """The TorchScript-compiled loop ``name`` (compiled once per process; eager if scripting fails)."""
    if not scripted:
        return _LOOPS[name]
    if name not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script: still the fastest here
                _SCRIPTED[name] = torch.jit.script(_LOOPS[name])
        except Exception:  # noqa: BLE001 (a torch build without TorchScript: the eager loop is correct, only slower)
            _SCRIPTED[name] = _LOOPS[name]
    return _SCRIPTED[name]


def _weight_grad(d_pre: Tensor, out: Tensor, h0: Tensor) -> Tensor:
    """sum_t d_pre[t]^T h[t-1], as one large matrix multiply plus the first step's."""
    d_w = d_pre[0].t().mm(h0)
    if d_pre.size(0) > 1:
        d_w = d_w.addmm(d_pre[1:].flatten(0, 1).t(), out[:-1].flatten(0, 1))
    return d_w


class _FusedLSTM(torch.autograd.Function):
    """One LSTM layer over a time-major chunk, with hand-written backward."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, scale, scripted: bool):
        out, h, c, ps, ks, fs = _loop("lstm_fwd", scripted)(xp, h0, c0, w_hh.t(), scale, True)
        ctx.save_for_backward(w_hh, out, h0)
        ctx.saved = (ps, ks, fs)
        ctx.scripted = scripted
        return out, h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        w_hh, out, h0 = ctx.saved_tensors
        ps, ks, fs = ctx.saved
        ctx.saved = None
        d_a, d_h0, d_c0 = _loop("lstm_bwd", ctx.scripted)(d_out, d_h, d_c, w_hh, ps, ks, fs)
        return d_a, d_h0, d_c0, _weight_grad(d_a, out, h0), None, None


class _FusedGRU(torch.autograd.Function):
    """One GRU layer over a time-major chunk, with hand-written backward."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, slope: float, scripted: bool):
        out, h, qs, zs, dns = _loop("gru_fwd", scripted)(xp, h0, w_hh.t(), b_hh, slope, True)
        ctx.save_for_backward(w_hh, out, h0)
        ctx.saved = (qs, zs, dns)
        ctx.scripted = scripted
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h):
        w_hh, out, h0 = ctx.saved_tensors
        qs, zs, dns = ctx.saved
        ctx.saved = None
        d_xp, d_rec, d_h0 = _loop("gru_bwd", ctx.scripted)(d_out, d_h, w_hh, qs, zs, dns)
        return d_xp, d_h0, _weight_grad(d_rec, out, h0), d_rec.sum((0, 1)), None, None


# -- the module ------------------------------------------------------------------------------------
class CustomRecurrent(nn.Module):
    """Stacked LSTM/GRU/RNN with gate slope and layer norm, called like ``nn.LSTM(batch_first=True)``."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.cell, self.layers, self.hidden = c.cell, c.layers, c.hidden
        self.gate_slope = float(c.gate_slope)
        self.layer_norm = bool(c.layer_norm)
        self.relu = c.activation == "relu"
        self.dropout = c.dropout if c.layers > 1 else 0.0
        self.use_scripted = True  # False: the same loops in eager Python (for tests and comparisons)
        gh = GATES[c.cell] * c.hidden
        for k in range(c.layers):
            in_dim = c.input_dim if k == 0 else c.hidden
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gh, in_dim)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gh, c.hidden)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gh)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gh)))
            if self.layer_norm:  # names avoid "bias"/"weight_*h" so init_recurrent leaves them alone
                for part, size in (("ih", gh), ("hh", gh)) + ((("cell", c.hidden),) if c.cell == "lstm" else ()):
                    self.register_parameter(f"ln_{part}_gain_l{k}", nn.Parameter(torch.ones(size)))
                    self.register_parameter(f"ln_{part}_shift_l{k}", nn.Parameter(torch.zeros(size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default for its RNNs: every weight and bias uniform in +-1/sqrt(hidden)."""
        bound = 1.0 / math.sqrt(self.hidden)
        for name, p in self.named_parameters():
            if not name.startswith("ln_"):
                nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.cell}, layers={self.layers}, hidden={self.hidden}, gate_slope={self.gate_slope:g}, "
                f"layer_norm={self.layer_norm}, dropout={self.dropout:g}")

    def _p(self, name: str, k: int) -> Tensor:
        return getattr(self, f"{name}_l{k}")

    def _initial(self, x: Tensor, state):
        """Per-layer float32 (h, c) lists; zeros when ``state`` is None."""
        if state is None:
            z = x.new_zeros(self.layers, x.size(0), self.hidden, dtype=torch.float32)
            state = (z, z) if self.cell == "lstm" else z
        if self.cell == "lstm":
            h0, c0 = state
            return list(h0.float().unbind(0)), list(c0.float().unbind(0))
        return list(state.float().unbind(0)), None

    def forward(self, x: Tensor, state=None):
        """``x`` (batch, time, input); returns the top layer's outputs and the state after the last step."""
        hs, cs = self._initial(x, state)
        new_h: List[Tensor] = []
        new_c: List[Tensor] = []
        out = x
        for k in range(self.layers):
            if k > 0 and self.dropout > 0:
                out = F.dropout(out, self.dropout, self.training)
            xp = self._input_projection(out, k)
            with torch.autocast(x.device.type, enabled=False):
                out, h, c = self._run_layer(xp.float().transpose(0, 1).contiguous(), hs[k], cs[k] if cs else None, k)
            out = out.transpose(0, 1)
            new_h.append(h)
            if c is not None:
                new_c.append(c)
        h_n = torch.stack(new_h)
        return out, ((h_n, torch.stack(new_c)) if self.cell == "lstm" else h_n)

    def _input_projection(self, x: Tensor, k: int) -> Tensor:
        """All time steps at once; folds in every bias the recurrence does not need separately."""
        w, b_ih, b_hh = self._p("weight_ih", k), self._p("bias_ih", k), self._p("bias_hh", k)
        if self.layer_norm:
            xp = F.layer_norm(F.linear(x, w), [w.size(0)], self._p("ln_ih_gain", k), self._p("ln_ih_shift", k)) + b_ih
        else:
            xp = F.linear(x, w, b_ih)
        # The GRU's recurrent bias of the "new" gate sits inside r * (W h + b), so it stays in the loop.
        return xp if self.cell == "gru" else xp + b_hh

    def _lstm_scale(self, like: Tensor) -> Tensor:
        """Per-unit multipliers of the LSTM pre-activations: the slope on i, f, o; 1 on the cell input."""
        if self.gate_slope == 1.0:
            return like.new_empty(0)
        scale = like.new_full((4, self.hidden), self.gate_slope)
        scale[2] = 1.0
        return scale.view(-1)

    def _run_layer(self, xp: Tensor, h: Tensor, c: Tensor | None, k: int):
        """One layer over the time-major projection ``xp``: outputs (T, B, H), final h and c (or None)."""
        w_hh, b_hh = self._p("weight_hh", k).float(), self._p("bias_hh", k).float()
        scripted = self.use_scripted
        if not self.layer_norm and self.cell in ("lstm", "gru"):
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xp, h, w_hh, b_hh, c) if t is not None)
            if self.cell == "lstm":
                scale = self._lstm_scale(xp)
                if needs_grad:
                    return _FusedLSTM.apply(xp, h, c, w_hh, scale, scripted)
                out, h, c, _, _, _ = _loop("lstm_fwd", scripted)(xp, h, c, w_hh.t(), scale, False)
                return out, h, c
            if needs_grad:
                out, h = _FusedGRU.apply(xp, h, w_hh, b_hh, self.gate_slope, scripted)
            else:
                out, h, _, _, _ = _loop("gru_fwd", scripted)(xp, h, w_hh.t(), b_hh, self.gate_slope, False)
            return out, h, None
        # layer norm (and the plain RNN): autograd through the scripted step loop
        ln_g = ln_b = lnc_g = lnc_b = xp.new_empty(0)
        if self.layer_norm:
            ln_g, ln_b = self._p("ln_hh_gain", k), self._p("ln_hh_shift", k)
            if self.cell == "lstm":
                lnc_g, lnc_b = self._p("ln_cell_gain", k), self._p("ln_cell_shift", k)
        loop = _loop(self.cell, scripted)
        if self.cell == "lstm":
            return loop(xp, h, c, w_hh, self._lstm_scale(xp), self.layer_norm, ln_g, ln_b, lnc_g, lnc_b)
        if self.cell == "gru":
            out, h = loop(xp, h, w_hh, b_hh, self.gate_slope, self.layer_norm, ln_g, ln_b)
        else:
            out, h = loop(xp, h, w_hh, self.relu, self.layer_norm, ln_g, ln_b)
        return out, h, None
