"""Record the convolution calls of a meta-step and replay exactly those calls on their own.

Shared by ``maml_floor.py`` (metalearn's rows, in process) and ``_l2l_step.py`` (learn2learn's
row, in the peer interpreter), so that both sides are recorded and replayed the same way.

A call is recorded at the level the kernels see it (a ``TorchDispatchMode``: below autograd and
below ``vmap``'s batching rules, so a vmapped convolution appears as the grouped convolution it
becomes): ``aten.convolution`` and ``aten.convolution_backward``, each with its tensors' shapes,
strides and dtype and its other arguments (stride, padding, groups, output mask, ...). A
record is plain JSON, so the peer can hand its own to this interpreter.

The replay runs the recorded calls in their order, under ``torch.no_grad()``, on tensors of the
recorded shapes and strides filled with normal noise (one tensor per distinct spec, reused): the
same kernels with the same arguments, and nothing else. Its time is what the step's convolutions
cost on their own.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CALLS = {
    "convolution": torch.ops.aten.convolution.default,
    "convolution_backward": torch.ops.aten.convolution_backward.default,
}
_NAMES = {op: name for name, op in CALLS.items()}


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "stride": list(value.stride()), "dtype": str(value.dtype).split(".")[-1]}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, torch.SymInt):
        return int(value)
    return value


class ConvolutionCalls(TorchDispatchMode):
    """``with ConvolutionCalls() as rec: step()``; then ``rec.calls``: a JSON-able list of
    ``{"op": name, "args": [...]}`` in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _NAMES:
            if kwargs:
                raise ValueError(f"{func} called with keyword arguments {sorted(kwargs)}: not recorded")
            self.calls.append({"op": _NAMES[func], "args": _encode(args)})
        return func(*args, **(kwargs or {}))


def record(step) -> list[dict]:
    """The convolution calls of one call of ``step``."""
    with ConvolutionCalls() as recorder:
        step()
    return recorder.calls


def replayer(calls: list[dict], device: str = "cpu"):
    """A function that runs ``calls`` once (see the module's docstring); tensors built once here."""
    tensors: dict[tuple, torch.Tensor] = {}
    generator = torch.Generator(device=device).manual_seed(0)

    def build(value):
        if isinstance(value, dict) and "tensor" in value:
            key = (tuple(value["tensor"]), tuple(value["stride"]), value["dtype"])
            if key not in tensors:
                # storage for the strides as recorded (expanded inputs have zero strides)
                size = 1 + sum((n - 1) * s for n, s in zip(key[0], key[1])) if all(key[0]) else 0
                storage = torch.empty(size, dtype=getattr(torch, key[2]), device=device).normal_(generator=generator)
                tensors[key] = storage.as_strided(key[0], key[1])
            return tensors[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [build(v) for v in value]
        return value

    program = [(CALLS[c["op"]], [build(a) for a in c["args"]]) for c in calls]

    def replay():
        with torch.no_grad():
            for op, args in program:
                op(*args)

    return replay


def summary(calls: list[dict]) -> dict:
    """Call counts by op, and the multiply-adds of all calls (as ``maml_convolutions.py`` counts:
    a forward costs output elements x input channels per group x kernel area; each gradient that
    a backward returns (input, weight) the same, on its ``grad_output``)."""
    counts: dict[str, int] = {}
    macs = 0
    for call in calls:
        counts[call["op"]] = counts.get(call["op"], 0) + 1
        args = call["args"]
        if call["op"] == "convolution":
            x, w = args[0]["tensor"], args[1]["tensor"]
            stride, padding, dilation = args[3], args[4], args[5]
            out_hw = [(x[2 + i] + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
            macs += x[0] * w[0] * out_hw[0] * out_hw[1] * (w[1] * w[2] * w[3])
        else:
            grad_out, w, mask = args[0]["tensor"], args[2]["tensor"], args[-1]
            n = 1
            for d in grad_out:
                n *= d
            macs += n * (w[1] * w[2] * w[3]) * (int(mask[0]) + int(mask[1]))
    return {"calls": counts, "macs": macs}
