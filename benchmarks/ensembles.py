"""Is the champion better as an ensemble, with test-time augmentation, with the phylum-aware
head? Studies over two offline ImageNet backbones on photo-style generated data, one per seed and
head kind, scored on the test split; and the prediction cost of each champion kind.

For every seed (the study's sampler and trial seeds; the data set and its split stay fixed):
a study with today's head (phylum_loss_weight fixed at 0) and one that searches
phylum_loss_weight in [0, 1], each with --trials trials. Of each study it scores, on test:
- the best single trial, plain and with flip TTA;
- the ensemble `promote-best --ensemble K` selects (K best trials), plain and with flip TTA;
- what `promote-best --ensemble auto --tta auto` would promote.
These come from the probabilities every complete trial stored (the champion's own predictions
within float16; checked against real champions below), so no model is rebuilt per variant.
Then the seed-0 study's champions are really promoted (single, single+TTA, ensemble,
ensemble+TTA) and their prediction cost is timed on the same test images in one run.

    .venv/bin/python benchmarks/ensembles.py [--families 40] [--images 2400] [--trials 40]
        [--seeds 0 1 2] [--ensemble 10]

Resumable: studies live under benchmarks/results/ensembles/ and only missing trials run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, WORK, log, prepared

BACKBONES = ["efficientnet_lite0", "mobilenet_v2_tv"]
HEADS = {"plain": "0.0", "phylum": "{low = 0.0, high = 1.0}"}


def study_settings(root: Path, data_dir: Path, seed: int, head: str, epochs: int):  # noqa: ANN201
    from search.settings import Settings

    folder = root / f"seed{seed}-{head}"
    folder.mkdir(parents=True, exist_ok=True)
    space = folder / "space.toml"
    space.write_text(
        f"[space]\nbackbone = {json.dumps(BACKBONES)}\nphylum_loss_weight = {HEADS[head]}\n"
    )
    return Settings(
        storage=f"sqlite:///{folder / 'study.sqlite3'}",
        study=f"ensembles-seed{seed}-{head}",
        data_dir=data_dir,
        features_dir=WORK / "features",
        models_dir=folder / "models",
        artifacts_dir=folder / "artifacts",
        space_file=space,
        max_epochs=epochs,
        feature_views=2,
        seed=seed,
        pruner="median",
    )


def run_study(settings, trials: int) -> None:  # noqa: ANN001
    from optuna.trial import TrialState

    from search.study import create_or_load, open_storage
    from search.worker import run_worker

    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if done < trials:
        log(f"{settings.study}: running {trials - done} trials")
        run_worker(settings, n_trials=trials - done)


def score_variants(settings, k: int) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Test accuracy and macro-F1 of each champion variant, from the stored probabilities."""
    import numpy as np

    from search.ensemble import choose, load_library
    from search.evaluate import phylum_accuracy
    from search.metrics import compute_metrics
    from search.registry import top_trials
    from search.study import load, open_artifact_store, open_storage

    study = load(open_storage(settings, heartbeat=False), settings)
    store = open_artifact_store(settings)
    trials = top_trials(study, k)
    phyla = json.loads((Path(settings.data_dir) / "prepared.json").read_text())["phyla"]
    out: dict[str, dict[str, float]] = {}
    variants = {
        "single": (None, "none"),
        "single+tta": (None, "flip"),
        f"ensemble{k}": (k, "none"),
        f"ensemble{k}+tta": (k, "flip"),
        "auto": ("auto", "auto"),
    }
    started = time.perf_counter()
    for name, (ensemble, tta) in variants.items():
        choice = choose(study.study_name, trials, store, ensemble, tta)
        members = [t for t, _ in choice.members]
        lib = load_library(members, store, "val_flip" if choice.tta else "val", with_test=True)
        assert lib.test is not None and lib.test_labels is not None
        probs = np.tensordot(np.array([w for _, w in choice.members]), lib.test, axes=1)
        metrics = compute_metrics(lib.test_labels, probs)
        out[name] = {
            "backbones": len({t.params["backbone"] for t in members}),
            "macro_f1": metrics["macro_f1"],
            "accuracy": metrics["accuracy"],
            "phylum_accuracy": phylum_accuracy(lib.test_labels, probs.argmax(1), phyla),
            "members": len(choice.members),
            "tta": choice.tta,
            "val_macro_f1": choice.val_macro_f1,
        }
    out["selection_seconds"] = {"all variants": round(time.perf_counter() - started, 2)}
    return out


def prediction_cost(settings, k: int) -> list[dict[str, float]]:  # noqa: ANN001
    """Promote each champion kind for real and time its predictions on the same images."""
    import numpy as np

    from search.dataset import load_prepared
    from search.evaluate import HeldOutSplit
    from search.registry import load_champion, promote_best

    split = HeldOutSplit.of(load_prepared(settings.data_dir))
    images = np.asarray(split.images)
    rows = []
    kinds = [("single", None, "none"), ("single+tta", None, "flip"),
             (f"ensemble{k}", k, "none"), (f"ensemble{k}+tta", k, "flip")]  # fmt: skip
    champions = {}
    for name, ensemble, tta in kinds:
        info = promote_best(settings, force=True, ensemble=ensemble, tta=tta)
        champions[name] = load_champion(settings.models_dir)
        rows.append({"kind": name, "members": len(info["members"]),
                     "backbones": len({m["backbone"] for m in info["members"]}),
                     "test_macro_f1": info["test"]["macro_f1"]})  # fmt: skip
    for row in rows:  # all timed after all are built, back to back, twice; the faster counts
        champion = champions[row["kind"]]
        champion.predict(images[:64])  # warm up: trace once
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            champion.predict(images)
            best = min(best, time.perf_counter() - t)
        row["ms_per_image"] = 1000 * best / len(images)
    base = rows[0]["ms_per_image"]
    for row in rows:
        row["x_single"] = row["ms_per_image"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=40)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ensemble", type=int, default=10, help="library size K")
    args = parser.parse_args()

    data_dir = prepared(args.families, args.images, args.image_px, args.image_size,
                        style="photos")  # fmt: skip
    root = RESULTS / "ensembles" / data_dir.name  # studies are bound to their data
    results: dict[str, dict] = {}
    for seed in args.seeds:
        for head in HEADS:
            settings = study_settings(root, data_dir, seed, head, args.epochs)
            run_study(settings, args.trials)
            results[f"{seed}/{head}"] = score_variants(settings, args.ensemble)
            log(f"{settings.study}: {json.dumps(results[f'{seed}/{head}'])}")
    cost = prediction_cost(study_settings(root, data_dir, args.seeds[0], "plain", args.epochs),
                           args.ensemble)  # fmt: skip

    info = json.loads((data_dir / "prepared.json").read_text())
    print(f"\n{len(info['classes'])} families in {len(set(info['phyla']))} phyla, "
          f"{info['counts']['rows']} photo-style images (train {info['counts']['train']}, "
          f"val {info['counts']['val']}, test {info['counts']['test']}) at {args.image_size} px, "
          f"backbones {', '.join(BACKBONES)}, {args.trials} trials a study, "
          f"seeds {args.seeds}")  # fmt: skip
    variants = [v for v in results[f"{args.seeds[0]}/plain"] if v != "selection_seconds"]
    for head in HEADS:
        searched = "searched in [0, 1]" if head == "phylum" else "0"
        print(f"\ntest split, {head} head (phylum_loss_weight {searched}), mean ± sd over seeds")
        print(
            f"  {'champion':<16} {'macro-F1':>16} {'accuracy':>16} {'phylum acc':>16}  "
            "members per seed (t: TTA, b: backbones)"
        )
        for v in variants:
            rows = [results[f"{s}/{head}"][v] for s in args.seeds]
            cells = []
            for key in ("macro_f1", "accuracy", "phylum_accuracy"):
                values = [r[key] for r in rows]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
            members = "/".join(
                f"{r['members']}{'t' if r['tta'] else ''}({r['backbones']}b)" for r in rows
            )
            print(f"  {v:<16} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}  {members}")
    print("\nphylum-aware minus plain head, per seed (test macro-F1):")
    for v in variants:
        deltas = [results[f"{s}/phylum"][v]["macro_f1"] - results[f"{s}/plain"][v]["macro_f1"]
                  for s in args.seeds]  # fmt: skip
        print(f"  {v:<16} " + "  ".join(f"{d:+.3f}" for d in deltas)
              + f"   mean {statistics.mean(deltas):+.3f}")  # fmt: skip
    print(f"\nprediction cost, seed {args.seeds[0]} plain study, real champions, one run:")
    for row in cost:
        print(f"  {row['kind']:<16} {row['members']:>2} member(s), {row['backbones']} backbone(s)"
              f"  test macro-F1 "
              f"{row['test_macro_f1']:.3f}  {row['ms_per_image']:6.2f} ms/image  "
              f"{row['x_single']:.2f}x single")  # fmt: skip
    (RESULTS / "ensembles.json").write_text(json.dumps({"results": results, "cost": cost},
                                                       indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
