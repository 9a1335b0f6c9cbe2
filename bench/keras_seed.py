"""The seed's own stack, for the comparison in docs/performance.md: Keras + ImageDataGenerator, fp32, batch 32.

Trains the seed-style CNN (3x [3x3 valid conv + ReLU + 2x2 max-pool] with 32/64/128 filters, flatten, dense 128,
dropout 0.5, dense 3; 14.8 M parameters) on in-memory 256x256 grayscale images, augmented by
`ImageDataGenerator` with lungxray's `seed` preset ranges, and prints images per second (median and best step
after warm-up) as JSON. Never install TensorFlow into the project's environment; use a throwaway one:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu scipy pillow
    /tmp/tfvenv/bin/python bench/keras_seed.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    args = ap.parse_args()

    import keras
    import tensorflow as tf
    from keras import layers

    ImageDataGenerator = tf.keras.preprocessing.image.ImageDataGenerator  # Keras 3 keeps it in the tf.keras API

    keras.utils.set_random_seed(0)
    n, s = args.batch_size * (args.warmup + args.steps), args.size  # one pass: Keras 3 stops at the end
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, s, s, 1)).astype("float32") / 255.0
    y = keras.utils.to_categorical(rng.integers(0, 3, n), 3)
    model = keras.Sequential([
        keras.Input((s, s, 1)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.5), layers.Dense(3, "softmax"),
    ])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    gen = ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, shear_range=5,
                             zoom_range=0.1, fill_mode="nearest") if args.augment else ImageDataGenerator()
    stamps: list[float] = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            stamps.append(time.perf_counter())

    total = args.warmup + args.steps
    flow = gen.flow(x, y, batch_size=args.batch_size, seed=0)
    t0 = time.perf_counter()
    model.fit(flow, steps_per_epoch=total, epochs=1, verbose=0, callbacks=[Stamp()])
    times = np.diff([t0, *stamps])[args.warmup:]
    print(json.dumps({
        "framework": f"keras {keras.__version__} / tensorflow {tf.__version__}",
        "augment": "ImageDataGenerator" if args.augment else "none",
        "params": model.count_params(), "batch_size": args.batch_size, "steps": args.steps,
        "images_per_second": args.batch_size / float(np.median(times)),
        "images_per_second_best": args.batch_size / float(times.min()),
        "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
