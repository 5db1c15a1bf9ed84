"""A TF1-style LeNet, as on the MaTEx slide: placeholders, `minimize`,
`Session.run` with `feed_dict`. Runs unchanged, data-parallel:

    mpiexec -n 2 python -m transparent_dist examples/tf1_lenet.py

Each rank reads its shard of the data with transparent_dist.data.DataSet
when given a file; here it makes its own, and the averaged gradients keep
every rank's variables identical.
"""

import argparse

import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

tf.compat.v1.disable_eager_execution()
x = tf.compat.v1.placeholder(tf.float32, [None, 28, 28, 1])
y = tf.compat.v1.placeholder(tf.int64, [None])


def weight(name, shape):
    return tf.compat.v1.get_variable(
        name, shape, initializer=tf.compat.v1.glorot_uniform_initializer()
    )


def conv_pool(inputs, name, channels):
    kernel = weight(name, [5, 5, inputs.shape[-1], channels])
    conv = tf.nn.relu(tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID"))
    return tf.nn.max_pool2d(conv, ksize=2, strides=2, padding="VALID")


pool2 = conv_pool(conv_pool(x, "conv1", 6), "conv2", 16)
flat = tf.reshape(pool2, [-1, 4 * 4 * 16])
hidden = tf.nn.relu(flat @ weight("fc1", [256, 84]) + weight("b1", [84]))
logits = hidden @ weight("fc2", [84, 10]) + weight("b2", [10])
loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
train = tf.compat.v1.train.AdamOptimizer(1e-3).minimize(loss)
accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))

rng = np.random.default_rng()
labels = rng.integers(0, 10, size=4096)
images = rng.normal(0, 1, size=(4096, 28, 28, 1)).astype("float32")
images[np.arange(4096), 2 * labels + 3, 2 * labels + 3, 0] += 6.0  # a learnable mark

with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    for step in range(args.steps):
        i = rng.integers(0, 4096 - args.batch_size)
        feed = {x: images[i : i + args.batch_size], y: labels[i : i + args.batch_size]}
        _, value = sess.run([train, loss], feed_dict=feed)
        if step % 20 == 0:
            print(f"step {step}: loss {value:.3f}")
    print("accuracy", sess.run(accuracy, feed_dict={x: images[:512], y: labels[:512]}))
