"""The linear layers of CPU decoding through oneDNN, where this machine runs them faster.

    with onednn_linears(model, rows=batch_size) as how:   # "onednn (1.9x ...)", "mkl (...)" or "plain: <why>"
        ... decode ...

A decode step multiplies a few rows (the batch) by every weight of the model: for Gemma 3 270M the
126 body projections (401 MB, fp32) and the 262k x 640 output head (671 MB). torch's fp32 `linear`
goes to MKL's sgemm, which at such shapes runs well below this machine's speed on some CPUs: on the
2-core AMD EPYC (AVX2) of this project, 24 rows x Gemma's head take 0.33 s through MKL, 0.13 s
through oneDNN with the weight packed once (`torch.ops.mkldnn._reorder_linear_weight` and
`_linear_pointwise`, what torch's own CPU inference compilation uses), and the 126 body projections
0.14 s against 0.09 s. At training and scoring shapes (hundreds to thousands of rows) the two are
within 5-20% (training's products, grad_input included, 0-14%), not worth the packs and the timing:
those stay plain.

So on a CPU, for fp32 weights and no autograd, every plain `nn.Linear` of at least MIN_DIM inputs
and outputs (the head, the projections, the base layers inside a peft LoRA layer; not the small
LoRA factors) is packed once, and the packed and plain layers are timed against each other at the
decode batch's row count on this very model; the packed ones are used only where they are at
least FASTER times faster, and the plain forwards come back afterwards. Same weights, same fp32
arithmetic; only the kernel's summation order differs (logits agree to ~1e-5). A pack is kept
for the next call while its weight is unchanged (a weak reference and the tensor's version), and
only where all the packs take at most a quarter of the free memory. Where torch lacks the packed
op, oneDNN's plain `mkldnn_linear` on a converted weight is used (slower: its output is converted
back every call).
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

FASTER = 1.15  # use oneDNN only when it is at least this much faster here
MIN_DIM = 64  # smaller layers (LoRA factors) stay plain: nothing to gain
TIMED_ROWS = 64  # the timing runs at most this many rows ...
TIMED_PER_SHAPE = 8  # ... through at most this many layers of each shape (a 7B model's is then seconds)
_PACKS: dict = {}  # id(weight) -> (weakref to the weight, its version, PackedLinear)
_CHOICE: dict = {}  # (timed rows, shapes) -> (use oneDNN?, how)


def _linear_pointwise_ok() -> bool:
    import torch

    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear:
    """A Linear's forward through oneDNN with its weight packed once (inference only)."""

    def __init__(self, linear, rows: int):
        import torch

        self.plain, self.out_features = weakref.ref(linear), linear.weight.shape[0]  # packs must not keep it alive
        w = linear.weight.detach()
        self.pointwise = _linear_pointwise_ok()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows) if self.pointwise else w.to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x):
        import torch

        linear = self.plain()
        if (
            (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
            or x.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
        ):
            return torch.nn.functional.linear(x, linear.weight, linear.bias)  # autograd, another dtype, autocast
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if self.pointwise:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        else:
            y = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), self.weight, None).to_dense()
            y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def linears(model) -> list:
    """The layers that can take a pack: plain fp32 CPU `nn.Linear`s with both sides >= MIN_DIM."""
    import torch

    return [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
        and min(m.weight.shape) >= MIN_DIM
    ]


def _why_not(model, layers) -> str | None:
    import torch

    if not layers:
        kinds = sorted({f"{p.device.type} {p.dtype}" for p in model.parameters()})
        return f"no fp32 CPU linear layer (weights: {', '.join(kinds) or 'none'})"
    if not torch.backends.mkldnn.is_available():
        return "torch has no oneDNN"
    from q2g.memory import free_memory

    new = sum(m.weight.numel() * 4 for m in layers if _cached(m) is None)
    if new > free_memory("cpu") / 4:
        return f"no room for packed copies of the weights ({new / 1e9:.1f} GB)"
    return None


def _cached(linear):
    entry = _PACKS.get(id(linear.weight))
    w = linear.weight
    if entry and entry[0]() is w and entry[1] == w._version:
        return entry[2]
    return None


def packs(layers, rows: int) -> list:
    """A PackedLinear per layer, reused while its weight is unchanged (at any row count: `rows` only
    hints the layout, a pack runs any number of rows); packs of other weights are dropped (one
    model's packs at a time)."""
    out = [_cached(m) or PackedLinear(m, rows) for m in layers]
    _PACKS.clear()
    _PACKS.update({id(m.weight): (weakref.ref(m.weight), m.weight._version, p) for m, p in zip(layers, out)})
    return out


def _seconds(fns, xs, reps: int = 2) -> float:
    for fn, x in zip(fns, xs):
        fn(x)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for fn, x in zip(fns, xs):
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def timed_sample(layers: list) -> list[int]:
    """Indices of the layers the timing runs: up to TIMED_PER_SHAPE of each weight shape (layers
    of one shape run alike; several of them keep the weights streaming from memory, as in decoding)."""
    seen: dict = {}
    keep = []
    for i, m in enumerate(layers):
        shape = tuple(m.weight.shape)
        seen[shape] = seen.get(shape, 0) + 1
        if seen[shape] <= TIMED_PER_SHAPE:
            keep.append(i)
    return keep


def choose(layers, packed, rows: int) -> tuple[bool, str]:
    """Whether oneDNN is at least FASTER times faster on these very layers at `rows` rows (at most
    TIMED_ROWS; a sample of the layers, `timed_sample`), timed once per set of shapes and row count."""
    import torch

    n = min(rows, TIMED_ROWS)
    key = (n, tuple(tuple(m.weight.shape) for m in layers))  # what the timing depends on
    if key not in _CHOICE:
        idx = timed_sample(layers)
        with torch.inference_mode():
            xs = [torch.randn(n, 1, layers[i].in_features) for i in idx]
            plain = _seconds([torch.nn.Linear.forward.__get__(layers[i]) for i in idx], xs)
            fast = _seconds([packed[i] for i in idx], xs)
        ratio = plain / fast
        use = ratio >= FASTER
        how = f"{'onednn' if use else 'mkl'} ({ratio:.2f}x oneDNN vs MKL at {n} rows, {len(layers)} layers)"
        _CHOICE[key] = (use, how)
        print(f"[q2g] CPU decoding: linear layers {how}", flush=True)
    return _CHOICE[key]


@contextmanager
def onednn_linears(model, rows: int):
    """Inside: the model's linear layers run through oneDNN where `choose` says it is faster. Yields
    how they run; the plain forwards are back afterwards (also on an error)."""
    rows = max(1, rows)
    layers = linears(model)
    why = _why_not(model, layers)
    if why:
        yield f"plain: {why}"
        return
    packed = packs(layers, rows)
    use, how = choose(layers, packed, rows)
    if not use:
        yield how
        return
    for m, p in zip(layers, packed):
        m.forward = p
    try:
        yield how
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
