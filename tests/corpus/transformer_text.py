"""Text classification with a Transformer block: token and position
embeddings (the positions `arange(0, maxlen)` are looked up for the whole
batch at once, not per sample), MultiHeadAttention, GlobalAveragePooling1D,
Adam, validation data, and a sample count that leaves a short last batch.

Mirrors keras-io examples/nlp/text_classification_with_transformer.py, on
synthetic token ids instead of IMDB, and with dropout rate 0 (the example's
0.1 draws its masks per rank, which no comparison with one process could
match number for number).
"""

import argparse

import keras
import numpy as np
from keras import layers, ops

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()


class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [
                layers.Dense(ff_dim, activation="relu"),
                layers.Dense(embed_dim),
            ]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


vocab_size = 200  # Only consider the top 200 words
maxlen = 16  # Only consider the first 16 words of each text
keras.utils.set_random_seed(31)
rng = np.random.default_rng(31)


def synthetic_texts(count):
    """Token ids padded (with 0, in front, as pad_sequences does) to
    maxlen; the label says whether low ids outnumber high ones."""
    lengths = rng.integers(4, maxlen + 1, size=count)
    texts = [rng.integers(1, vocab_size, size=n).tolist() for n in lengths]
    labels = np.array([int(np.mean(t) < vocab_size / 2) for t in texts])
    return keras.utils.pad_sequences(texts, maxlen=maxlen), labels


x_train, y_train = synthetic_texts(430)
x_val, y_val = synthetic_texts(70)
print(len(x_train), "Training sequences")
print(len(x_val), "Validation sequences")

embed_dim = 16  # Embedding size for each token
num_heads = 2  # Number of attention heads
ff_dim = 16  # Hidden layer size in feed forward network inside transformer
dropout_rate = 0.0

inputs = layers.Input(shape=(maxlen,))
embedding_layer = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)
x = embedding_layer(inputs)
transformer_block = TransformerBlock(embed_dim, num_heads, ff_dim, dropout_rate)
x = transformer_block(x)
x = layers.GlobalAveragePooling1D()(x)
x = layers.Dropout(dropout_rate)(x)
x = layers.Dense(20, activation="relu")(x)
x = layers.Dropout(dropout_rate)(x)
outputs = layers.Dense(2, activation="softmax")(x)

model = keras.Model(inputs=inputs, outputs=outputs)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(
    x_train,
    y_train,
    batch_size=args.batch_size,
    epochs=args.epochs,
    validation_data=(x_val, y_val),
    verbose=2,
)
