"""A variational autoencoder with a custom train_step (KL + reconstruction
losses in `Mean` trackers), then its decoder asked for one latent point at
a time.

Mirrors keras-io examples/generative/vae.py: a `Sampling` layer drawing
from a SeedGenerator, encoder and decoder models, `vae.fit(digits)` on the
images alone, and `plot_latent_space`, which decodes a grid of latent
points with `decoder.predict(z_sample)`, one sample per call. Here the
"digits" are synthetic 8x8 blobs. The latent noise is drawn per rank (as
one process draws it per sample), so the script trains like one process
rather than number for number.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()
latent_dim = 2


class Sampling(layers.Layer):
    """Uses (z_mean, z_log_var) to sample z, the vector encoding a digit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        batch = ops.shape(z_mean)[0]
        dim = ops.shape(z_mean)[1]
        epsilon = keras.random.normal(shape=(batch, dim), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


keras.utils.set_random_seed(61)
encoder_inputs = keras.Input(shape=(8, 8, 1))
x = layers.Conv2D(8, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
x = layers.Flatten()(x)
x = layers.Dense(16, activation="relu")(x)
z_mean = layers.Dense(latent_dim, name="z_mean")(x)
z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
z = Sampling()([z_mean, z_log_var])
encoder = keras.Model(encoder_inputs, [z_mean, z_log_var, z], name="encoder")

latent_inputs = keras.Input(shape=(latent_dim,))
x = layers.Dense(4 * 4 * 8, activation="relu")(latent_inputs)
x = layers.Reshape((4, 4, 8))(x)
x = layers.Conv2DTranspose(8, 3, activation="relu", strides=2, padding="same")(x)
decoder_outputs = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
decoder = keras.Model(latent_inputs, decoder_outputs, name="decoder")


class VAE(keras.Model):
    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [
            self.total_loss_tracker,
            self.reconstruction_loss_tracker,
            self.kl_loss_tracker,
        ]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(
                ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
            )
            kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {
            "loss": self.total_loss_tracker.result(),
            "reconstruction_loss": self.reconstruction_loss_tracker.result(),
            "kl_loss": self.kl_loss_tracker.result(),
        }


# 650 "digits": a bright 3x3 blob somewhere on a dim 8x8 canvas.
rng = np.random.default_rng(7)
digits = np.full((650, 8, 8, 1), 0.05, "float32")
for i, (r, c) in enumerate(rng.integers(0, 6, size=(650, 2))):
    digits[i, r : r + 3, c : c + 3, 0] = 0.95

vae = VAE(encoder, decoder)
vae.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01))
vae.fit(digits, epochs=args.epochs, batch_size=args.batch_size, verbose=2)


def plot_latent_space(vae, n=3, scale=1.0):
    """The decoded images of an n x n grid of latent points, one point per
    `predict` call (keras-io then shows the figure with matplotlib)."""
    figure = np.zeros((8 * n, 8 * n))
    grid_x = np.linspace(-scale, scale, n)
    grid_y = np.linspace(-scale, scale, n)[::-1]
    for i, yi in enumerate(grid_y):
        for j, xi in enumerate(grid_x):
            z_sample = np.array([[xi, yi]])
            x_decoded = vae.decoder.predict(z_sample, verbose=0)
            digit = x_decoded[0].reshape(8, 8)
            figure[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8] = digit
    return figure


figure = plot_latent_space(vae)
assert figure.shape == (24, 24) and np.isfinite(figure).all()
# The grid decoded in one call must be what the one-point calls gave.
corners = vae.decoder.predict(np.array([[-1.0, 1.0], [1.0, -1.0]]), verbose=0)
np.testing.assert_allclose(corners[0, :, :, 0], figure[:8, :8], atol=1e-6)
np.testing.assert_allclose(corners[1, :, :, 0], figure[-8:, -8:], atol=1e-6)
print("latent grid decoded:", figure.mean())
