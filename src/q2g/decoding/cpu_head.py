"""The output projection of CPU decoding through oneDNN, where this machine runs it faster.

    with onednn_head(model, rows=batch_size) as how:   # how: "onednn (2.3x ...)" or "mkl (...)"
        ... decode ...

A decode step multiplies a few rows (the batch) by the whole output projection: for Gemma 3 270M a
262k x 640 fp32 matrix, more than half of the step. torch's fp32 `linear` goes to MKL's sgemm,
which at such shapes runs well below the machine's speed on some CPUs: on the 2-core AMD EPYC
(AVX2) of this project, 24 rows x 262k x 640 take 0.37 s through MKL and 0.16 s through oneDNN
with the weight converted once (as torch.utils.mkldnn's MkldnnLinear does), 0.16 s in OpenBLAS (issue 30's profile). At
training shapes (hundreds of rows) the two are within 15%.

So on a CPU, for fp32 weights and no autograd, the head is packed once for oneDNN and timed against
the plain one at the decode batch's row count on this very model; the packed head is used only
where it is at least FASTER times faster (else the plain one stays). Same weights, same fp32
arithmetic; only the summation order of the kernel differs (logits agree to ~1e-5). The pack
(a copy of the head: 671 MB for Gemma 3 270M) is kept for the next call on the same unchanged
weight, and only where it takes at most a quarter of the free memory.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

FASTER = 1.15  # use oneDNN only when it is at least this much faster here
_PACKED: dict = {}  # "entry": (weakref to the weight, its version, rows, OneDNNHead or None, how)


def _output_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return base, head


def _why_not(head) -> str | None:
    import torch

    if head is None or type(head) is not torch.nn.Linear:
        return "no plain Linear output head"
    w = head.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return f"weights on {w.device.type} in {w.dtype}"
    if not torch.backends.mkldnn.is_available():
        return "torch has no oneDNN"
    from q2g.memory import free_memory

    if w.numel() * 4 > free_memory("cpu") / 4:
        return "no room for a packed copy of the head"
    return None


class OneDNNHead:
    """A Linear's forward through oneDNN with its weight packed once (inference only)."""

    def __init__(self, head):

        self.plain, self.out_features = weakref.ref(head), head.weight.shape[0]  # the cache must not keep it alive
        self.weight = head.weight.detach().to_mkldnn()  # as torch.utils.mkldnn.MkldnnLinear keeps it
        self.bias = None if head.bias is None else head.bias.detach()

    def __call__(self, x):
        import torch

        if (
            (torch.is_grad_enabled() and x.requires_grad)
            or x.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
        ):
            return self.plain()(x)  # autograd, or another dtype / autocast: the plain head decides
        flat = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
        y = torch._C._nn.mkldnn_linear(flat, self.weight, None).to_dense()
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _seconds(fn, x, reps: int = 3) -> float:
    fn(x)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def choose(head, rows: int):
    """(OneDNNHead or None, how): timed on `head` itself at `rows` rows, once per unchanged weight.
    The cache holds a weak reference to the weight it was made from: another model's weight at the
    same address (the first one freed) is never taken for it."""
    import torch

    w = head.weight
    cached = _PACKED.get("entry")
    if cached and cached[0]() is w and cached[1:3] == (w._version, rows):
        return cached[3], cached[4]
    _PACKED.clear()  # one packed head at a time
    packed = OneDNNHead(head)
    with torch.inference_mode():
        x = torch.randn(rows, 1, head.in_features)
        plain, fast = _seconds(head, x), _seconds(packed, x)
    ratio = plain / fast
    use = packed if ratio >= FASTER else None
    how = f"{'onednn' if use else 'mkl'} ({ratio:.2f}x oneDNN vs MKL at {rows} rows)"
    _PACKED["entry"] = (weakref.ref(w), w._version, rows, use, how)
    print(f"[q2g] CPU decoding: output head {how}", flush=True)
    return use, how


@contextmanager
def onednn_head(model, rows: int):
    """Inside: the model's output head is the oneDNN one where `choose` says it is faster. Yields
    how the head runs ("onednn (...)", "mkl (...)" or "plain: <why not>"); restores the head."""
    base, head = _output_head(model)
    why = _why_not(head) or (None if hasattr(base, "set_output_embeddings") else "no set_output_embeddings")
    if why:
        yield f"plain: {why}"
        return
    packed, how = choose(head, max(1, rows))
    if packed is None:
        yield how
        return
    base.set_output_embeddings(_module(packed))
    try:
        yield how
    finally:
        base.set_output_embeddings(head)


def _module(packed: OneDNNHead):
    """`packed` as a torch Module (set_output_embeddings wants one; it holds no parameters, so the
    model's parameter list is unchanged while it is in)."""
    import torch

    class _Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "_packed", packed)

        def forward(self, x):
            return self._packed(x)

    return _Head()
