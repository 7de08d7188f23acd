"""What the feature cache buys: one 10-epoch trial of a frozen ImageNet backbone, trained on cached
features vs with the frozen base inside the model, side by side in one run.

Same data (generated: 20 families, 2,000 images at 256 px, prepared at 224 px), same head, same
seed, same training code (search.trial.fit_on_table: the table of cached features, or of the
images, handed to the backend once, whole epochs per execution), same batch order, no
augmentation (K = 0 feature views), validation macro-F1 after every epoch in both; the only
difference is whether the backbone runs once per image (cache) or in every epoch (in the model).
Their validation scores agree up to the float16 rounding of the cached features. If the
in-model variant would run past --in-model-budget-min, it stops early
and its per-epoch time is extrapolated to the full trial (and the output says so).

    .venv/bin/python benchmarks/feature_cache.py [--epochs 10] [--images 2000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from common import HEAD_PARAMS, WORK, log, machine, prepared, timed

BACKBONE = "efficientnet_lite0"
SEED = 7


class ValScore(keras.callbacks.Callback):
    """Validation macro-F1 of `scored` after every epoch (what a trial reports, computed as a
    trial does), and a time budget."""

    def __init__(
        self, scored: keras.Model, val_x: np.ndarray, val_y: np.ndarray, budget_s: float
    ) -> None:
        super().__init__()
        self.scored, self.val_x, self.val_y, self.budget_s = scored, val_x, val_y, budget_s
        self.scores: list[float] = []
        self.epoch_s: list[float] = []
        self._start = self._epoch_start = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from search.metrics import macro_f1
        from search.trial import predict

        probs = predict(self.scored, self.val_x)
        self.scores.append(macro_f1(self.val_y, probs))
        now = time.perf_counter()
        self.epoch_s.append(now - self._epoch_start)
        log(
            f"  epoch {epoch + 1}: val macro-F1 {self.scores[-1]:.3f}, {self.epoch_s[-1]:.1f}s"
            f" (elapsed {now - self._start:.0f}s)"
        )
        if (now - self._start) + self.epoch_s[-1] > self.budget_s:
            self.model.stop_training = True


def train(model, views, labels, class_weights, val_x, val_y, epochs: int, budget_s: float):
    """One trial's training as search.trial runs it, scored after every epoch."""
    from search.trial import fit_on_table

    score = ValScore(model, val_x, val_y, budget_s)
    fit_on_table(model, views, labels, class_weights, HEAD_PARAMS, epochs, [score], SEED)
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--in-model-budget-min", type=float, default=15.0)
    args = parser.parse_args()

    from search import features
    from search.backbones import build_backbone
    from search.dataset import load_prepared
    from search.trial import build_head

    print(f"feature cache vs frozen base in the model: {BACKBONE} imagenet, {machine()}")
    data = load_prepared(prepared(20, args.images, 256, 224))
    n = {s: len(data.indices(s)) for s in ("train", "val", "test")}
    print(f"data: {len(data.classes)} families, train {n['train']}, val {n['val']}, "
          f"test {n['test']} images at {data.image_size} px; {args.epochs} epochs, head "
          f"{HEAD_PARAMS['units_0']} units, batch {HEAD_PARAMS['batch_size']}")  # fmt: skip
    times: dict[str, float] = {}
    cache_root = Path(tempfile.mkdtemp(prefix="features-", dir=WORK))
    try:
        log("computing the feature cache (plain view; val and test also mirrored)")
        with timed(times, "extract"):
            feats = features.load_or_compute(
                data, BACKBONE, "imagenet", cache_root, views=0, seed=0, log=log
            )
        plain = feats.train[0].astype(np.float32)
        stats = (plain.mean(0), plain.var(0))
        n_classes = len(data.classes)

        log("trial on cached features")
        with timed(times, "cached"):
            keras.utils.set_random_seed(SEED)
            head = build_head(feats.dim, n_classes, HEAD_PARAMS, feature_stats=stats)
            cached = train(
                head,
                np.asarray(feats.train),
                feats.train_labels,
                data.class_weights,
                feats.val.astype(np.float32),
                feats.val_labels,
                args.epochs,
                1e9,
            )

        log("the same trial with the frozen base inside the model")
        keras.backend.clear_session()
        images, labels = data.arrays("train")
        val_x, val_y = data.arrays("val")
        with timed(times, "in_model"):
            keras.utils.set_random_seed(0)
            base = build_backbone(BACKBONE, data.image_size, "imagenet")
            keras.utils.set_random_seed(SEED)
            head = build_head(feats.dim, n_classes, HEAD_PARAMS, feature_stats=stats)
            inputs = keras.Input((data.image_size, data.image_size, 3), name="image")
            model = keras.Model(inputs, head(base(inputs)))
            in_model = train(
                model,
                images[None],
                labels,
                data.class_weights,
                val_x,
                val_y,
                args.epochs,
                args.in_model_budget_min * 60,
            )
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    ran = len(in_model.scores)
    in_model_s = times["in_model"]
    note = ""
    if ran < args.epochs:
        per_epoch = float(np.mean(in_model.epoch_s))
        in_model_s += per_epoch * (args.epochs - ran)
        note = (
            f"  (EXTRAPOLATED: ran {ran} of {args.epochs} epochs in {times['in_model']:.0f}s, "
            f"+{args.epochs - ran} x {per_epoch:.1f}s/epoch measured)"
        )
    print(f"feature extraction, once per backbone:    {times['extract']:8.1f}s")
    print(f"{args.epochs}-epoch trial on cached features:      {times['cached']:8.1f}s  "
          f"val macro-F1 {max(cached.scores):.3f} (last {cached.scores[-1]:.3f})")  # fmt: skip
    best, last = max(in_model.scores), in_model.scores[-1]
    print(f"{args.epochs}-epoch trial, frozen base in the model: {in_model_s:8.1f}s  "
          f"val macro-F1 {best:.3f} (last {last:.3f}){note}")  # fmt: skip
    common = min(ran, len(cached.scores))
    diff = np.abs(np.array(cached.scores[:common]) - np.array(in_model.scores[:common]))
    print(f"per-epoch val macro-F1 difference over {common} epochs: max {diff.max():.3f}")
    ratio = in_model_s / times["cached"]
    print(f"speed-up per trial (cache warm): {ratio:.0f}x (target >= 200x: "
          f"{'MET' if ratio >= 200 else 'NOT MET'})")  # fmt: skip
    first = in_model_s / (times["cached"] + times["extract"])
    print(f"first trial including the one-time extraction: {first:.1f}x")


if __name__ == "__main__":
    main()
