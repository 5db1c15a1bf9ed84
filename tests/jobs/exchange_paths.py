"""The same training with each gradient-exchange path: one fused buffer,
many small buckets, float16 and bfloat16 compression; the native op and the
numpy fallback.

    mpiexec -n N python -m transparent_dist exchange_paths.py OUT
"""

import json
import os
import sys

import keras
import numpy as np

import transparent_dist
from transparent_dist.tf import native

out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 10)).astype("float32")
y = np.tanh(x @ rng.normal(size=(10, 1))).astype("float32")
result = {}
# Blocks (`backprop_order`) as across nodes: with tiny buckets every kernel
# is computed in row blocks, sent one by one.
base = {"fusion_mb": 64.0, "compression": "none", "native": "auto", "backprop_order": "blocks"}
for name, settings in {
    "fused": base,
    "buckets": {**base, "fusion_mb": 0.0005},  # one bucket per variable
    "fp16": {**base, "compression": "fp16"},
    "bf16": {**base, "compression": "bf16"},
    # The numpy exchange (where the native op cannot be built).
    "numpy": {**base, "native": "off"},
    "numpy_buckets": {**base, "native": "off", "fusion_mb": 0.0005},
    "numpy_fp16": {**base, "native": "off", "compression": "fp16"},
}.items():
    transparent_dist.configure(**settings)
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    result[name] = {
        "weights": np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist(),
        "loss": history.history["loss"],
        "path": native.status().split(" (")[0],
    }


def bucket_ancestry() -> dict:
    """With one bucket per variable or block of one (`backprop_order`), which
    gradients each exchange op of a traced train step waits for (its
    ancestors in the graph)."""
    import tensorflow as tf

    from transparent_dist.tf import backprop_order

    transparent_dist.configure(
        fusion_mb=0.0001, compression="none", native="auto", backprop_order="blocks"
    )
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(64), keras.layers.Dense(64), keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.SGD(0.01)
    blocks = {}

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        for i, g in enumerate(grads):
            blocks[i] = [p.op.name for p in backprop_order.pieces(g) or [g]]
        optimizer.apply(grads, model.trainable_variables)

    graph = step.get_concrete_function(tf.zeros((4, 10)), tf.zeros((4, 1))).graph
    exchanges = [op for op in graph.get_operations() if op.type == "TdAllreduce"]

    def ancestors(op):
        seen, stack = set(), [op]
        while stack:
            current = stack.pop()
            for parent in [t.op for t in current.inputs] + list(current.control_inputs):
                if parent.name not in seen:
                    seen.add(parent.name)
                    stack.append(parent)
        return seen

    # Variables: kernel, bias of each layer. The first layer's kernel
    # gradient is the last work of backprop; the second layer's is computed
    # in blocks, each of which may leave before the next is computed.
    first_kernel, second_kernel = blocks[0], blocks[2]
    return {
        "exchanges": len(exchanges),
        "variables": len(model.trainable_variables),
        "second_kernel_blocks": len(second_kernel),
        "waits_for_first_layer": [
            any(name in ancestors(op) for name in first_kernel) for op in exchanges
        ],
        "second_kernel_blocks_awaited": [
            sum(name in ancestors(op) for name in second_kernel) for op in exchanges
        ],
        "negotiations": sum(op.type == "TdNegotiate" for op in graph.get_operations()),
        "buckets": [op.get_attr("bucket") for op in exchanges],
        # Each exchange starts after the one before it (the first after the
        # step's negotiation): the order every rank's MPI calls follow.
        "chained": [
            (exchanges[k - 1] if k else negotiation).name in [c.name for c in op.control_inputs]
            for k, op in enumerate(exchanges)
            for negotiation in [op.inputs[1].op]
        ],
    }


result["ancestry"] = bucket_ancestry()
with open(os.path.join(out, f"paths-rank{transparent_dist.rank()}.json"), "w") as f:
    json.dump(result, f)
