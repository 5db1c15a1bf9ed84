"""Weight gradients first, in blocks: the backward pass hands the exchange
its bytes as early as it can.

```python
import tensorflow as tf
from transparent_dist.tf import backprop_order
backprop_order.install()
w = tf.Variable(tf.ones((512, 4096)))
@tf.function
def grads(x):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf.matmul(x, w))
    return tape.gradient(y, w)
g = grads(tf.ones((8, 512)))          # the same gradient as without it
assert backprop_order.pieces(g) is None   # outside the traced step, a plain tensor
backprop_order.uninstall()
```

A layer's backward pass computes two products: the gradient of its weight
(which goes to the exchange, and nowhere else) and the gradient of its
input (which the layers before it wait for). TensorFlow starts both at once
and they share the cores, so the weight's gradient, the one the link waits
for, is done only when both are. Here, for `MatMul`, `Conv2D` and `Conv3D`
with a variable as one input, the weight's gradient comes first and the
input's gradient after it: the same operations, in an order, so the
backward pass takes as long as before and the first bytes leave earlier.

With `TD_BACKPROP_ORDER=blocks`, a large 2-D weight's gradient (`MatMul`,
the weight of a `Dense` layer) is also computed in blocks of rows, one
after the other, `TD_FUSION_MB` each at most, and joined:
`exchange.average` sees through the join (`pieces`) and sends each block
as soon as it exists, so the link starts on a layer's
gradient while the rest of it computes, and after the backward pass only
the last block is left to send. Each block is the same sums over the batch
as the whole product, so the gradient equals the unsplit one to float
rounding (the kernels may sum in another order, ~1e-7); the plugin installs
this only when more than one rank trains, so one process stays plain
TensorFlow, bit for bit.

Off by default (`TD_BACKPROP_ORDER=off`): on this project's two shaped
"nodes" (benchmarks/overlap.py, docs/scaling.md) the order made the step
faster over a 1 Gbit/s link (490 -> 458 ms, in blocks 445) and slower over
10 Gbit/s (301 -> 334, in blocks 349), where the exchange already hid
behind the compute. Turn it on where the exchange takes longer than the
backward pass.
"""

from __future__ import annotations

from typing import Any

__all__ = ["blocks_here", "install", "installed", "pieces", "reset", "uninstall"]

# The join of a blocked gradient is named so; `pieces` recognises it.
_JOIN = "td_weight_gradient_blocks"
# The ops ordered -> whether a weight's gradient may be computed in blocks.
# Only those whose input gradient is one op that can wait: a batched matmul
# with a broadcast weight (a Dense layer on 3-D input) ends its gradients in
# a sum, and an einsum in several ops, so ordering them would only delay
# the last op, not the work; they are left as TensorFlow has them.
_ORDERED = {"MatMul": True, "Conv2D": False, "Conv3D": False}
_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    """Orders (and blocks) the gradients of the ops above; idempotent. The
    replaced gradient functions stay reachable (`_ORIGINAL`)."""
    registry = _registry()
    for op_type, blocks in _ORDERED.items():
        if op_type in _ORIGINAL or op_type not in registry:
            continue
        original = registry[op_type]["type"]
        _ORIGINAL[op_type] = original
        registry[op_type]["type"] = _ordered(original, blocks)


def uninstall() -> None:
    """Puts the original gradient functions back."""
    registry = _registry()
    for op_type, original in _ORIGINAL.items():
        registry[op_type]["type"] = original
    _ORIGINAL.clear()


def _registry() -> dict[str, dict[str, Any]]:
    """TensorFlow's table of op type -> gradient function: the tape and
    `tf.gradients` both look the function up there, at each gradient."""
    from transparent_dist.tf import internals

    return internals.ops._gradient_registry._registry


reset = uninstall  # `activation.reset`: the plugin off, TensorFlow's own gradients back


def installed() -> bool:
    return bool(_ORIGINAL)


def pieces(gradient: Any) -> list[Any] | None:
    """The blocks a gradient was computed in (row blocks, in the order they
    were computed; joined along axis 0 they are `gradient`), or None for a
    gradient computed whole."""
    op = getattr(gradient, "op", None)
    if op is None or op.type != "ConcatV2" or _JOIN not in op.name:
        return None
    return list(op.inputs[:-1])


def _is_weight(tensor: Any) -> bool:
    """Whether `tensor` is a variable's value (through casts and identities,
    as mixed precision and Keras read it)."""
    op = getattr(tensor, "op", None)
    while op is not None and op.type in ("Identity", "Cast") and op.inputs:
        op = op.inputs[0].op
    return op is not None and op.type == "ReadVariableOp"


def _ordered(original: Any, blocks: bool) -> Any:
    def gradient(op: Any, grad: Any) -> Any:
        import tensorflow as tf

        from transparent_dist.core import config

        # Eager ops run in call order already. The setting is read here, at
        # trace time, so `configure(backprop_order="off")` after import works.
        if tf.executing_eagerly() or config.SETTINGS.backprop_order == "off":
            return original(op, grad)
        inputs = list(op.inputs)
        weights = [i for i, t in enumerate(inputs[:2]) if _is_weight(t)]
        if len(weights) != 1:
            return original(op, grad)
        weight = weights[0]
        if blocks and weight == 1 and _blockable(op):
            return _blocked_matmul_grad(op, grad)
        grads = list(original(op, grad))
        first = grads[weight]
        if first is None:
            return grads
        for i, g in enumerate(grads):
            if i != weight and g is not None and hasattr(g, "op"):
                g.op._add_control_input(first.op)
        return grads

    return gradient


def blocks_here() -> bool:
    """Whether large weight gradients are computed in blocks
    (`TD_BACKPROP_ORDER=blocks`); the same answer on every rank, since the
    exchange's buckets depend on it."""
    from transparent_dist.core import config

    return config.SETTINGS.backprop_order == "blocks"


def _blockable(op: Any) -> bool:
    """Whether `MatMul(a, w)`'s weight gradient is computed in blocks: asked
    for, untransposed, 2-D, of known shape and larger than a bucket."""
    from transparent_dist.core import config

    if not blocks_here() or op.get_attr("transpose_a") or op.get_attr("transpose_b"):
        return False
    a, b = op.inputs[0], op.inputs[1]
    if not (a.dtype.is_floating and a.shape.rank == 2 and b.shape.is_fully_defined()):
        return False
    limit = config.SETTINGS.fusion_mb * 1e6
    return limit > 0 and b.shape.num_elements() * b.dtype.size > limit


def _blocked_matmul_grad(op: Any, grad: Any) -> list[Any]:
    """`MatMul(a, w)`'s gradients: dw = a^T grad in row blocks of at most
    `TD_FUSION_MB`, one after the other, then da = grad w^T."""
    import tensorflow as tf

    from transparent_dist.core import config

    a, w = op.inputs[0], op.inputs[1]
    rows, cols = (int(d) for d in w.shape)
    row_bytes = cols * w.dtype.size
    per_block = max(1, int(config.SETTINGS.fusion_mb * 1e6 // row_bytes))
    count = -(-rows // per_block)
    # Even blocks: the last is not a sliver that costs a whole op.
    per_block = -(-rows // count)
    parts: list[Any] = []
    for start in range(0, rows, per_block):
        with tf.control_dependencies(parts[-1:]):
            parts.append(tf.matmul(a[:, start : start + per_block], grad, transpose_a=True))
    dw = tf.concat(parts, axis=0, name=_JOIN)
    skip = getattr(op, "skip_input_indices", None) or ()
    if 0 in skip:
        return [None, dw]
    with tf.control_dependencies(parts[-1:]):
        da = tf.matmul(grad, w, transpose_b=True)
    return [da, dw]
