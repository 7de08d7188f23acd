"""Full-size rehearsal: the real workflow, end to end, on a generated set of the real set's shape.

synth (202 families, 400 species, 11,983 full-size photos) -> `search prepare` (224 px) ->
the feature caches of the offline ImageNet backbones -> 2 `search worker` processes sharing one
SQLite study -> `promote-best` -> `search evaluate` -> `search predict` on 100 photos ->
`search status`; then the species-held-out check: `search prepare --split-by species` of the same
zip, a short study on it, and the image-split champion scored on its test split.

Every step is the real command in its own process (like `make demo`), in its own workspace
(benchmarks/results/full_scale/, via SEARCH_* variables). It prints one table, a row per phase:
wall time, throughput, peak RSS of each process, disk used, load average, and a projection for
one H100/H200-class GPU host whose assumptions are printed beside it. Results are kept in
<workspace>/phases.json: a rerun skips finished phases (`--table` only reprints the table).

    .venv/bin/python benchmarks/full_scale.py                   # the full run, about 1 hour
    .venv/bin/python benchmarks/full_scale.py --smoke           # the same on a tiny set
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv the script runs in: its `search`, `promote-best`
DEFAULT_WORKSPACE = Path("benchmarks/results/full_scale")
# The offline ImageNet backbones searched. The from-scratch CNN is left out: trained end to end
# at 224 px on 2 CPU cores it takes many minutes an epoch. EfficientNet-Lite1/2 are left out for
# time: their extraction costs 1.5x/2.5x Lite0's, ~40 min more here (--backbones adds them).
BACKBONES = ("efficientnet_lite0", "mobilenet_v2_tv")
RAW_IMAGES = 256  # images of the short raw-forward measurement beside each extraction
BATCH = 64  # features.load_or_compute's batch size

# Projection for one H100/H200-class GPU host (16 CPU cores, as the lent GPU machines have).
# ASSUMPTIONS, not measurements (no GPU was lent to this run):
GPU_HOST_CORES = 16  # CPU-only phases (synth, prepare) scale with processes
GPU_FORWARD_IMAGES_S = 1500.0  # assumed frozen-backbone forward rate at 224 px, input included
GPU_HEAD_SPEEDUP = 1.0  # head trials: tiny dense nets, per-epoch overhead bound; no gain assumed


@dataclass
class Proc:
    """One finished process: exit code, wall seconds, peak RSS (MB) of it and its children (the
    largest of them), CPU seconds of it and its children."""

    label: str
    code: int
    wall_s: float
    rss_mb: float
    cpu_s: float
    output: str


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    items: float = 0.0
    unit: str = ""
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    disk_mb: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # 1-min load average: start, mean, max
    projection_s: float | None = None
    assumption: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def throughput(self) -> str:
        if not self.items or not self.wall_s:
            return ""
        if self.unit == "trials":
            return f"{self.items / self.wall_s * 3600:.0f} trials/h"
        return f"{self.items / self.wall_s:.1f} {self.unit}/s"


class Rehearsal:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ws: Path = args.workspace
        self.ws.mkdir(parents=True, exist_ok=True)
        (self.ws / "logs").mkdir(exist_ok=True)
        self.results_path = self.ws / "phases.json"
        self.results: dict[str, dict[str, Any]] = {}
        if self.results_path.exists():
            self.results = json.loads(self.results_path.read_text())

    # ---- paths and environments ---------------------------------------------------------------

    @property
    def zip_path(self) -> Path:
        return self.ws / "rare_species.zip"

    def env(self, species: bool = False) -> dict[str, str]:
        """The workspace's SEARCH_* variables (paths relative to the repository root)."""
        tag = "_species" if species else ""
        env = dict(os.environ)
        env.update(
            SEARCH_STORAGE=f"sqlite:///{self.ws}/study{tag}.sqlite3",
            SEARCH_STUDY=f"full-scale{tag}",
            SEARCH_DATA_DIR=str(self.ws / f"prepared{tag}"),
            SEARCH_FEATURES_DIR=str(self.ws / "features"),
            SEARCH_MODELS_DIR=str(self.ws / f"models{tag}"),
            SEARCH_ARTIFACTS_DIR=str(self.ws / f"artifacts{tag}"),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        return env

    # ---- running ----------------------------------------------------------------------------

    def run(self, phase: str, cmds: list[tuple[str, list[str]]], env: dict[str, str]) -> Phase:
        """Run `cmds` at once, each its own process; wait for all; peak RSS per process (wait4)
        and the load average sampled every 2 s. Stops the rehearsal if one fails."""
        done: dict[str, Proc] = {}
        started = time.perf_counter()
        load0 = os.getloadavg()[0]
        loads = [load0]

        def wait(label: str, proc: subprocess.Popen, log: Path, t0: float) -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            done[label] = Proc(
                label,
                proc.returncode,
                time.perf_counter() - t0,
                usage.ru_maxrss / 1024.0,
                usage.ru_utime + usage.ru_stime,
                log.read_text(errors="replace"),
            )

        threads = []
        for label, cmd in cmds:
            log = self.ws / "logs" / f"{phase}-{label}.log"
            say(f"[{phase}] {' '.join(cmd)}  (log: {log})")
            with log.open("w") as fh:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            t = threading.Thread(target=wait, args=(label, proc, log, time.perf_counter()))
            t.start()
            threads.append(t)
        while any(t.is_alive() for t in threads):
            time.sleep(2.0)
            loads.append(os.getloadavg()[0])
        for t in threads:
            t.join()
        result = Phase(phase, wall_s=time.perf_counter() - started)
        result.load = (load0, statistics.fmean(loads), max(loads))
        for label, _ in cmds:
            p = done[label]
            result.rss_mb[label] = round(p.rss_mb, 1)
            result.cpu_s[label] = round(p.cpu_s, 1)
            if p.code != 0:
                tail = "\n".join(p.output.strip().splitlines()[-15:])
                raise SystemExit(f"[{phase}] {label} exited with {p.code}:\n{tail}")
        result.notes["outputs"] = {label: done[label].output for label, _ in cmds}
        result.notes["wall_per_process_s"] = {k: round(v.wall_s, 1) for k, v in done.items()}
        return result

    def phase(self, name: str, body: Callable[[], Phase]) -> dict[str, Any]:
        """Run a phase unless phases.json already holds it; save it as soon as it ends."""
        if name in self.results:
            say(f"[{name}] done before ({self.results[name]['wall_s']:.0f}s): skipped")
            return self.results[name]
        result = body()
        record = result.__dict__ | {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        record["notes"] = {k: v for k, v in result.notes.items() if k != "outputs"}
        self.results[name] = record
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.results_path)
        say(f"[{name}] {result.wall_s:.0f}s {result.throughput()}")
        return record

    # ---- phases -----------------------------------------------------------------------------

    def synth(self) -> Phase:
        a = self.args
        if self.zip_path.exists():
            self.zip_path.unlink()  # a zip without a phases.json record is from an older run
        cmd = [str(BIN / "search"), "synth", str(self.zip_path), "--zip", "--style", "photos",
               "--sizes", "real", "--workers", str(a.workers), "--seed", "0"]  # fmt: skip
        if a.smoke:
            cmd += ["--labels", str(smoke_labels(self.ws / "smoke_labels.csv", a.families))]
        else:
            cmd.append("--real-shape")
        ph = self.run("synth", [("synth", cmd)], self.env())
        with zipfile.ZipFile(self.zip_path) as zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".jpg")]
        sizes = sorted(i.file_size for i in infos)
        ph.items, ph.unit = len(infos), "images"
        ph.disk_mb = mb(self.zip_path.stat().st_size)
        ph.notes["jpeg_kb_median_p90_max"] = [
            round(sizes[len(sizes) // 2] / 1024), round(sizes[int(0.9 * len(sizes))] / 1024),
            round(sizes[-1] / 1024)]  # fmt: skip
        ph.projection_s = ph.wall_s * a.workers / GPU_HOST_CORES
        ph.assumption = f"CPU only: scales to {GPU_HOST_CORES} processes"
        return ph

    def prepare(self, species: bool = False) -> Phase:
        a = self.args
        out = self.ws / ("prepared_species" if species else "prepared")
        cmd = [str(BIN / "search"), "prepare", str(self.zip_path), "--out", str(out),
               "--image-size", str(a.image_size), "--workers", str(a.workers)]  # fmt: skip
        if species:
            cmd += ["--split-by", "species"]
        ph = self.run("prepare_species" if species else "prepare", [("prepare", cmd)], self.env())
        info = json.loads((out / "prepared.json").read_text())
        kept = sum(1 for _ in open(out / "manifest.csv")) - 1
        ph.items, ph.unit = kept, "images"
        ph.disk_mb = mb(du(out))
        ph.notes["summary"] = ph.notes["outputs"]["prepare"].strip().splitlines()[-3:]
        ph.notes["classes"] = len(info["classes"])
        ph.projection_s = ph.wall_s * a.workers / GPU_HOST_CORES
        ph.assumption = f"CPU only: scales to {GPU_HOST_CORES} processes"
        return ph

    def features(self, backbone: str, species: bool = False) -> Phase:
        """What the first trial of a backbone does (the feature cache, views and seed as the
        workers use them), in a process of its own, beside a short raw-forward measurement."""
        data = self.ws / ("prepared_species" if species else "prepared")
        out = self.ws / "logs" / f"features-{backbone}{'-species' if species else ''}.json"
        cmd = [sys.executable, str(Path(__file__).relative_to(ROOT)), "--extract", backbone,
               "--data", str(data), "--features", str(self.ws / "features"),
               "--result", str(out)]  # fmt: skip
        if species:
            cmd.append("--no-raw")
        name = f"features_{backbone}{'_species' if species else ''}"
        ph = self.run(name, [("extract", cmd)], self.env(species))
        r = json.loads(out.read_text())
        ph.items, ph.unit = r["forward_passes"], "images"
        ph.disk_mb = mb(du(Path(r["cache"])))
        ph.notes.update(r)
        # the forward passes at the GPU rate, the rest (build, load, write) as measured
        forward = r["forward_passes"] / r["raw_images_s"] if r.get("raw_images_s") else ph.wall_s
        ph.projection_s = max(0.0, ph.wall_s - forward) + r["forward_passes"] / GPU_FORWARD_IMAGES_S
        ph.assumption = f"forward at {GPU_FORWARD_IMAGES_S:.0f} images/s (assumed)"
        return ph

    def search(self, species: bool = False) -> Phase:
        a = self.args
        space = self.ws / ("space_species.toml" if species else "space.toml")
        if species:
            champion = self.champion_backbone()
            space.write_text(f'[space]\nbackbone = "{champion}"\n')
            n_trials = a.species_trials
        else:
            chosen = ", ".join(f'"{b}"' for b in a.backbones)
            space.write_text(
                "# full_scale.py: the offline ImageNet backbones, frozen (head trials)\n"
                f"[space]\nbackbone = [{chosen}]\n"
            )
            n_trials = a.trials
        cmd = [str(BIN / "search"), "worker", "--n-trials", str(n_trials), "--space", str(space),
               "--max-epochs", str(a.max_epochs)]  # fmt: skip
        name = "search_species" if species else "search"
        ph = self.run(name, [("worker1", cmd), ("worker2", cmd)], self.env(species))
        stats = trial_stats(self.env(species))
        ph.items, ph.unit = stats["finished"], "trials"
        ph.notes.update(stats)
        per_worker = {}
        for label, text in ph.notes["outputs"].items():
            line = next((x for x in text.splitlines() if x.startswith("worker done")), "")
            per_worker[label] = {"line": line}
            n = sum(int(w) for w in _numbers_before_state(line))
            wall = ph.notes["wall_per_process_s"][label]
            per_worker[label]["trials_per_hour"] = round(n / wall * 3600, 1) if wall else None
        ph.notes["per_worker"] = per_worker
        tag = "_species" if species else ""
        ph.disk_mb = mb(du(self.ws / f"study{tag}.sqlite3") + du(self.ws / f"artifacts{tag}"))
        ph.projection_s = ph.wall_s / GPU_HEAD_SPEEDUP
        ph.assumption = "head trials as here (no GPU gain assumed)"
        return ph

    def promote(self, species: bool = False) -> Phase:
        name = "promote_species" if species else "promote"
        ph = self.run(name, [("promote", [str(BIN / "promote-best")])], self.env(species))
        ph.notes["summary"] = ph.notes["outputs"]["promote"].strip().splitlines()[:2]
        ph.disk_mb = mb(du(self.ws / ("models_species" if species else "models")))
        n_test = split_count(self.ws / ("prepared_species" if species else "prepared"), "test")
        ph.items, ph.unit = n_test, "test images"
        ph.projection_s, ph.assumption = self.forward_projection(ph.wall_s, n_test)
        return ph

    def evaluate(self, species: bool = False) -> Phase:
        name = "evaluate_species" if species else "evaluate"
        cmd = [str(BIN / "search"), "evaluate", "--json"]
        ph = self.run(name, [("evaluate", cmd)], self.env(species))
        text = ph.notes["outputs"]["evaluate"]
        result = json.loads(text[text.index("{") :])
        m = result["evaluation"]["metrics"]
        ph.notes["metrics"] = {k: m[k] for k in ("accuracy", "macro_f1", "top5_accuracy")}
        ph.notes["n_images"] = result["evaluation"]["n_images"]
        ph.notes["n_families"] = result["evaluation"]["n_families"]
        ph.items, ph.unit = ph.notes["n_images"], "test images"
        ph.disk_mb = mb(du(Path(result["folder"])))
        ph.projection_s, ph.assumption = self.forward_projection(ph.wall_s, ph.notes["n_images"])
        return ph

    def predict(self) -> Phase:
        photos = self.ws / "predict_photos"
        if photos.exists():
            shutil.rmtree(photos)
        files = extract_test_photos(self.zip_path, self.ws / "prepared", photos, self.args.predict)
        out = self.ws / "predictions.csv"
        cmd = [str(BIN / "search"), "predict", *map(str, files), "--top-k", "5",
               "--output", str(out)]  # fmt: skip
        ph = self.run("predict", [("predict", cmd)], self.env())
        ph.items, ph.unit = len(files), "photos"
        ph.disk_mb = mb(du(photos))
        with out.open() as fh:
            ph.notes["predictions"] = sum(1 for _ in fh) - 1
        ph.projection_s, ph.assumption = self.forward_projection(ph.wall_s, len(files))
        return ph

    def status(self) -> Phase:
        ph = self.run("status", [("status", [str(BIN / "search"), "status"])], self.env())
        ph.notes["text"] = ph.notes["outputs"]["status"].strip().splitlines()
        ph.disk_mb = mb(du(self.ws / "study.sqlite3"))
        ph.projection_s, ph.assumption = ph.wall_s, "as here"
        return ph

    def species_score(self) -> Phase:
        """The image-split champion on the species split's test images (its own scoring:
        `search evaluate` refuses data with other families than the model's)."""
        out = self.ws / "logs" / "species_score.json"
        cmd = [sys.executable, str(Path(__file__).relative_to(ROOT)), "--score-species",
               "--result", str(out), "--workspace", str(self.ws)]  # fmt: skip
        ph = self.run("species_score", [("score", cmd)], self.env())
        ph.notes.update(json.loads(out.read_text()))
        ph.items, ph.unit = ph.notes["species_test"]["n_images"], "test images"
        # the same command the docs suggest, to show what it says
        probe = subprocess.run(
            [str(BIN / "search"), "evaluate", "--data-dir", str(self.ws / "prepared_species")],
            cwd=ROOT, env=self.env(), capture_output=True, text=True,
        )  # fmt: skip
        last = (probe.stderr.strip().splitlines() or [""])[-1]
        ph.notes["search_evaluate_on_species_data"] = last.replace(f"{ROOT}{os.sep}", "")
        ph.projection_s, ph.assumption = self.forward_projection(ph.wall_s, ph.items)
        return ph

    # ---- helpers ------------------------------------------------------------------------------

    def forward_projection(self, wall_s: float, images: float) -> tuple[float, str]:
        """Backbone forward passes at the assumed GPU rate instead of the measured CPU one."""
        raw = [
            r["notes"].get("raw_images_s")
            for k, r in self.results.items()
            if k.startswith("features_") and r["notes"].get("raw_images_s")
        ]
        if not raw:
            return wall_s, "as here"
        cpu = statistics.fmean(raw)
        rest = max(0.0, wall_s - images / cpu)
        return rest + images / GPU_FORWARD_IMAGES_S, "forward at GPU rate (assumed)"

    def champion_backbone(self) -> str:
        info = json.loads((self.ws / "models" / "champion" / "champion.json").read_text())
        return str(info["backbone"])

    # ---- the whole rehearsal ------------------------------------------------------------------

    def all(self) -> None:
        a = self.args
        self.phase("synth", self.synth)
        self.phase("prepare", self.prepare)
        for backbone in a.backbones:
            self.phase(f"features_{backbone}", lambda b=backbone: self.features(b))
        self.phase("search", self.search)
        self.phase("promote", self.promote)
        self.phase("evaluate", self.evaluate)
        self.phase("predict", self.predict)
        self.phase("status", self.status)
        self.phase("prepare_species", lambda: self.prepare(species=True))
        champion = self.champion_backbone()
        self.phase(f"features_{champion}_species", lambda: self.features(champion, species=True))
        self.phase("search_species", lambda: self.search(species=True))
        self.phase("promote_species", lambda: self.promote(species=True))
        self.phase("evaluate_species", lambda: self.evaluate(species=True))
        self.phase("species_score", self.species_score)


# ---- the table ------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]], ws: Path) -> str:
    head = ("phase", "wall", "throughput", "peak RSS MB (per process)", "CPU s", "disk MB",
            "load avg", "GPU host (proj.)", "projection rests on")  # fmt: skip
    rows = []
    for name, r in results.items():
        ph = Phase(**{k: v for k, v in r.items() if k != "finished_at"})
        rss = ", ".join(f"{k} {v:.0f}" for k, v in ph.rss_mb.items())
        load = f"{ph.load[1]:.1f} (max {ph.load[2]:.1f})"
        proj = "" if ph.projection_s is None else fmt_s(ph.projection_s)
        cpu = "+".join(f"{v:.0f}" for v in ph.cpu_s.values())
        rows.append((name, fmt_s(ph.wall_s), ph.throughput(), rss, cpu, f"{ph.disk_mb:.0f}",
                     load, proj, ph.assumption))  # fmt: skip
    total = sum(r["wall_s"] for r in results.values())
    proj = sum(r["projection_s"] or 0.0 for r in results.values())
    rows.append(("total", fmt_s(total), "", "", "", f"{mb(du(ws)):.0f} (workspace)", "",
                 fmt_s(proj), ""))  # fmt: skip
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in
             [head, *rows]]  # fmt: skip
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def findings(results: dict[str, dict[str, Any]]) -> str:
    """The targets and the numbers the rehearsal is for, below the table."""
    out = []
    peak = max((v for r in results.values() for v in r["rss_mb"].values()), default=0.0)
    out.append(f"peak RSS of any process: {peak:.0f} MB (target < 6144): "
               f"{'MET' if peak < 6144 else 'NOT MET'}")  # fmt: skip
    if "synth" in results:
        s = results["synth"]
        out.append(f"synth: {s['items']:.0f} photos, {s['disk_mb'] / 1024:.2f} GB zip, JPEG KB "
                   f"median/p90/max {s['notes']['jpeg_kb_median_p90_max']}")  # fmt: skip
    if "prepare" in results:
        p = results["prepare"]
        rate = p["items"] / p["wall_s"]
        out.append(f"prepare: {rate:.0f} images/s on 2 processes (target >= 100): "
                   f"{'MET' if rate >= 100 else 'NOT MET'}")  # fmt: skip
        if p.get("cpu_s"):
            per_cpu = p["items"] / sum(p["cpu_s"].values())
            out.append(
                f"  {per_cpu:.1f} images per CPU-second (all its processes): {2 * per_cpu:.0f} "
                f"images/s on 2 free cores ({'MET' if 2 * per_cpu >= 100 else 'NOT MET'} there)"
            )
    for name, r in results.items():
        n = r["notes"]
        if name.startswith("features_") and n.get("raw_images_s"):
            ratio = n["images_s"] / n["raw_images_s"]
            out.append(
                f"{name}: extraction {n['images_s']:.1f} images/s over {n['forward_passes']} "
                f"forward passes (whole load_or_compute call; its compute loop "
                f"{n['meta']['images_per_second']} images/s) vs raw predict_on_batch "
                f"{n['raw_images_s']:.1f} images/s ({RAW_IMAGES} images, before and after): "
                f"{ratio:.0%} wall (target >= 90%): {'MET' if ratio >= 0.9 else 'NOT MET'}"
            )
            if n.get("raw_images_per_cpu_s"):
                cpu = n["images_per_cpu_s"] / n["raw_images_per_cpu_s"]
                out.append(
                    f"  per CPU-second of the process (robust to other load): extraction "
                    f"{n['images_per_cpu_s']:.1f} vs raw {n['raw_images_per_cpu_s']:.1f} "
                    f"images/CPU-s: {cpu:.0%} ({'MET' if cpu >= 0.9 else 'NOT MET'})"
                )
    for name in ("search", "search_species"):
        if name in results:
            n = results[name]["notes"]
            workers = "; ".join(f"{k} {v['trials_per_hour']} trials/h ({v['line']})"
                                for k, v in n["per_worker"].items())  # fmt: skip
            out.append(
                f"{name}: {n['states']}; median trial {n['median_trial_s']:.1f}s "
                f"(complete {n['median_complete_s']:.1f}s) at {n['classes']} classes, per "
                f"backbone {n['median_by_backbone']}; best val macro-F1 {n['best_value']:.3f} "
                f"({n['best_backbone']}); {workers}"
            )
    for name in ("evaluate", "evaluate_species"):
        if name in results:
            n = results[name]["notes"]
            out.append(f"{name}: {n['n_images']} test images, {n['n_families']} families: "
                       f"{_metrics(n['metrics'])}")  # fmt: skip
    if "species_score" in results:
        n = results["species_score"]["notes"]
        st, im, sub = n["species_test"], n["image_test"], n["image_test_same_families"]
        out.append(
            f"species split: {n['families_evaluable']} families evaluable on unseen species "
            f"(present in its test split), {st['n_images']} test images of "
            f"{n['species_test_species']} species; of them {n['overlap']} are in the image "
            "split's train/val/test"
        )
        out.append(f"  image-split champion on the image test split ({im['n_images']}, all "
                   f"families): {_metrics(im)}")  # fmt: skip
        out.append(f"  the same, image test split of those {n['families_evaluable']} families "
                   f"({sub['n_images']}): {_metrics(sub)}")  # fmt: skip
        out.append(f"  image-split champion on the species test split ({st['n_images']}; it "
                   f"TRAINED on {n['overlap']['train']} of them): {_metrics(st)}")  # fmt: skip
        out.append(f"  `search evaluate --data-dir <species data>` of that champion: "
                   f"{n['search_evaluate_on_species_data']}")  # fmt: skip
    return "\n".join(out)


def _metrics(m: dict[str, Any]) -> str:
    return (f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
            f"top-5 {m['top5_accuracy']:.3f}")  # fmt: skip


# ---- in-process parts (run as subprocesses of the rehearsal) ---------------------------------


def extract(backbone: str, data_dir: Path, features_dir: Path, result: Path, raw: bool) -> None:
    """The feature cache as a worker computes it, plus the backbone's raw predict_on_batch on
    RAW_IMAGES prepared images before and after (same process, same batch size)."""
    import numpy as np

    from search import features
    from search.backbones import build_backbone
    from search.dataset import load_prepared

    data = load_prepared(data_dir)
    out: dict[str, Any] = {"backbone": backbone}
    model = None
    raw_rates, raw_cpu_rates = [], []

    def raw_forward() -> None:
        pixels = np.asarray(data.images()[:RAW_IMAGES]).astype(np.float32)
        batches = [pixels[i : i + BATCH] for i in range(0, len(pixels), BATCH)]
        model.predict_on_batch(batches[0])  # trace once: the steady state is what counts
        t, c = time.perf_counter(), cpu_seconds()
        for b in batches:
            model.predict_on_batch(b)
        raw_rates.append(len(pixels) / (time.perf_counter() - t))
        raw_cpu_rates.append(len(pixels) / (cpu_seconds() - c))

    if raw:
        model = build_backbone(backbone, data.image_size, "imagenet")
        raw_forward()
    t, c = time.perf_counter(), cpu_seconds()
    feats = features.load_or_compute(data, backbone, "imagenet", features_dir, views=2, seed=0)
    out["wall_s"] = time.perf_counter() - t
    out["cpu_s"] = cpu_seconds() - c
    meta = json.loads((Path(features_dir) / feats.key / "meta.json").read_text())
    out["cache"] = str(Path(features_dir) / feats.key)
    out["meta"] = {k: meta.get(k) for k in ("seconds", "images_per_second", "counts", "views")}
    out["meta"]["feature_dim"] = feats.dim
    out["forward_passes"] = int(
        feats.train.shape[0] * feats.train.shape[1]
        + 2 * (len(feats.val) + len(feats.test))  # val and test, plain and mirrored
    )
    out["images_s"] = out["forward_passes"] / out["wall_s"]
    out["images_per_cpu_s"] = out["forward_passes"] / out["cpu_s"]
    if raw:
        raw_forward()
        out["raw_images_s_each"] = raw_rates
        out["raw_images_s"] = statistics.fmean(raw_rates)
        out["raw_images_per_cpu_s"] = statistics.fmean(raw_cpu_rates)
    result.write_text(json.dumps(out, indent=2))


def cpu_seconds() -> float:
    """CPU time of this process, all threads: what the work costs, whatever else runs."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def score_species(ws: Path, result: Path) -> None:
    """The image-split champion on the species split's test images: the 202-way model, scored
    on the families present (macro-F1 over them), beside its image-split test scores."""
    import numpy as np
    from sklearn.metrics import f1_score

    from search.dataset import load_prepared
    from search.metrics import top_k_accuracy
    from search.registry import load_champion

    champion = load_champion(ws / "models")
    image = load_prepared(ws / "prepared")
    species = load_prepared(ws / "prepared_species")
    index = {c: i for i, c in enumerate(champion.classes)}

    def scores(images: np.ndarray, labels: np.ndarray, present: list[int]) -> dict[str, Any]:
        probs = champion.predict(images)
        pred = probs.argmax(1)
        return {
            "n_images": int(len(labels)),
            "accuracy": float((pred == labels).mean()),
            "macro_f1": float(
                f1_score(labels, pred, labels=present, average="macro", zero_division=0)
            ),
            "top5_accuracy": top_k_accuracy(labels, probs, 5),
        }

    s_images, s_labels = species.arrays("test")
    s_true = np.array([index[species.classes[i]] for i in s_labels])
    fams = sorted({int(i) for i in s_true})
    i_images, i_labels = image.arrays("test")
    if image.classes != champion.classes:
        raise SystemExit("the champion was not trained on the image-split prepared data")
    keep = np.isin(i_labels, fams)
    split_of = dict(zip(image.manifest["file_path"], image.manifest["split"], strict=True))
    s_paths = species.manifest.set_index("index").loc[species.indices("test"), "file_path"]
    overlap: dict[str, int] = {}
    for p in s_paths:
        overlap[split_of.get(p, "none")] = overlap.get(split_of.get(p, "none"), 0) + 1
    s_test = species.manifest[species.manifest["split"] == "test"]
    out = {
        "families_evaluable": len(fams),
        "species_classes": len(species.classes),
        "species_test_species": int(s_test["eol_page_id"].nunique()),
        "overlap": overlap,
        "species_test": scores(s_images, s_true, fams),
        "image_test": scores(i_images, i_labels, sorted({int(i) for i in i_labels})),
        "image_test_same_families": scores(i_images[keep], i_labels[keep], fams),
    }
    result.write_text(json.dumps(out, indent=2))


# ---- small helpers ----------------------------------------------------------------------------


def trial_stats(env: dict[str, str]) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = env["SEARCH_STORAGE"]
    study = optuna.load_study(study_name=env["SEARCH_STUDY"], storage=url)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    secs, complete, by_backbone = [], [], {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        if t.datetime_start and t.datetime_complete and t.state.name in ("COMPLETE", "PRUNED"):
            s = (t.datetime_complete - t.datetime_start).total_seconds()
            secs.append(s)
            by_backbone.setdefault(t.params.get("backbone", "?"), []).append(s)
            if t.state.name == "COMPLETE":
                complete.append(s)
    prepared = json.loads((Path(env["SEARCH_DATA_DIR"]) / "prepared.json").read_text())
    best = study.best_trial if complete else None
    return {
        "states": states,
        "finished": len(secs),
        "median_trial_s": statistics.median(secs) if secs else 0.0,
        "median_complete_s": statistics.median(complete) if complete else 0.0,
        "median_by_backbone": {k: round(statistics.median(v), 1) for k, v in by_backbone.items()},
        "classes": len(prepared["classes"]),
        "best_value": best.value if best else 0.0,
        "best_backbone": best.params.get("backbone") if best else None,
    }


def _numbers_before_state(line: str) -> list[str]:
    """'worker done (budget) in 812s: 40 complete, 9 pruned' -> ['40', '9']."""
    tail = line.split(":", 1)[-1]
    return [w.split()[0] for w in tail.split(",") if w.strip() and w.split()[0].isdigit()]


def extract_test_photos(zip_path: Path, prepared: Path, out: Path, n: int) -> list[Path]:
    """`n` test photos of the image split, one family after another, out of the zip."""
    with (prepared / "manifest.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    by_family: dict[str, list[str]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r["file_path"])
    picked: list[str] = []
    while len(picked) < n and any(by_family.values()):
        for paths in by_family.values():
            if paths and len(picked) < n:
                picked.append(paths.pop(0))
    out.mkdir(parents=True)
    files = []
    with zipfile.ZipFile(zip_path) as zf:
        for p in picked:
            target = out / p.replace("/", "__")
            target.write_bytes(zf.read(f"rare_species/{p}"))
            files.append(target)
    return files


def smoke_labels(path: Path, n: int, per_species: int = 8) -> Path:
    """A small labels CSV for --smoke: `n` real families with 3+ species (so the species split
    has something to hold out) and 2 with one, `per_species` photos a species."""
    from search.synth import load_families

    table = load_families()
    chosen = [f for f in table if f.n_species >= 3][:n] + [f for f in table if f.n_species == 1][:2]
    lines = ["eol_content_id,eol_page_id,kingdom,phylum,family,file_path"]
    content, page = 30_000_000, 2_000_000
    for f in chosen:
        for _ in range(f.n_species):
            page += 1
            for _ in range(per_species):
                content += 1
                name = f"{f.phylum}_{f.family}/{content}_{page}_eol-full-size-copy.jpg"
                lines.append(f"{content},{page},animalia,{f.phylum},{f.family},{name}")
    path.write_text("\n".join(lines) + "\n")
    return path


def split_count(prepared: Path, split: str) -> int:
    with (prepared / "manifest.csv").open() as fh:
        return sum(1 for r in csv.DictReader(fh) if r["split"] == split)


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mb(n: float) -> float:
    return n / 2**20


def fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workspace", type=Path, default=DEFAULT_WORKSPACE, help="(repository-relative)"
    )
    p.add_argument("--smoke", action="store_true", help="a tiny set of --families real families")
    p.add_argument("--families", type=int, default=4, help="with --smoke (3+ species each)")
    p.add_argument("--trials", type=int, default=100, help="study budget of the main search")
    p.add_argument("--species-trials", dest="species_trials", type=int, default=16)
    p.add_argument("--max-epochs", dest="max_epochs", type=int, default=20)
    p.add_argument("--image-size", dest="image_size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="synth and prepare processes")
    p.add_argument("--predict", type=int, default=100, help="photos for `search predict`")
    p.add_argument("--backbones", type=lambda s: s.split(","), default=list(BACKBONES))
    p.add_argument("--table", action="store_true", help="only print the table of phases.json")
    p.add_argument("--redo", nargs="*", default=[], help="phases to run again")
    p.add_argument("--extract", help=argparse.SUPPRESS)
    p.add_argument("--score-species", dest="score_species", action="store_true",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-raw", dest="raw", action="store_false", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)  # every path (--workspace too) is relative to the repository root
    if args.extract:
        return extract(args.extract, args.data, args.features, args.result, args.raw)
    if args.score_species:
        return score_species(args.workspace, args.result)
    rehearsal = Rehearsal(args)
    for name in args.redo:
        rehearsal.results.pop(name, None)
    if not args.table:
        print(f"full-scale rehearsal in {args.workspace}: {os.cpu_count()} CPU cores, "
              f"load {os.getloadavg()[0]:.1f} at start", flush=True)  # fmt: skip
        rehearsal.all()
    print(table(rehearsal.results, args.workspace))
    print(findings(rehearsal.results))
    print(
        "projection: one H100/H200-class GPU host with "
        f"{GPU_HOST_CORES} CPU cores; ASSUMED, not measured: synth/prepare scale to "
        f"{GPU_HOST_CORES} processes, backbone forward (input included) at "
        f"{GPU_FORWARD_IMAGES_S:.0f} images/s, head trials no faster than here"
    )


if __name__ == "__main__":
    main()
