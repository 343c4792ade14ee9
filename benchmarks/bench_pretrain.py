"""CPU cost and quality of the scenes jobs with and without the pretrained encoder (benchmarks/pretrain_cpu.md).

Each run is `tools/train.py` (or `tools/make_pseudo_labels.py`) in a subprocess; its CPU time is the user +
system time of the process and everything it waited for (`os.wait4`), which, unlike wall time, does not
depend on how many other programs share the cores. A line per run goes to OUT/results.jsonl: the command,
CPU and wall seconds, the 1-minute load average before and after, and the run's eval.json / report.json.

    python benchmarks/bench_pretrain.py --out /tmp/bench_pretrain --runs build eomt eomt_scratch
    python benchmarks/bench_pretrain.py --out /tmp/bench_pretrain --runs weaktr --set_eomt train.total_steps=1500

The cache of pretrained encoders is OUT/cache ($JAXSEG_CACHE_DIR): "build" fills it (the main job's first
run), the other runs reuse it. The scenes are built once into OUT/data and shared.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def runs(out: pathlib.Path, eomt: list[str], weaktr: list[str], seg: list[str], dataset: str) -> dict[str, list[str]]:
    data = f"data.data_dir={out / 'data'}"
    train = [sys.executable, str(ROOT / "tools" / "train.py")]
    scratch = "pretrained.config="

    def job(config, name, *sets):
        sets = (data, "train.num_overlays=0", *sets)
        return [*train, "--config", config, "--workdir", str(out / name), *[a for s in sets for a in ("--set", s)]]
    pseudo = [sys.executable, str(ROOT / "tools" / "make_pseudo_labels.py"), "--checkpoint", str(out / "weaktr_cam"),
              "--data_dir", str(out / "data"), "--dataset", dataset, "--out_dir",
              str(out / "pseudo")]
    return {
        # The main job on an empty cache: builds the pretrained encoder, then trains.
        "build": job("configs/eomt/scenes.py:runlocal", "eomt_build", *eomt),
        "eomt": job("configs/eomt/scenes.py:runlocal", "eomt", *eomt),
        "eomt_scratch": job("configs/eomt/scenes.py:runlocal", "eomt_scratch", scratch, *eomt),
        "weaktr": job("configs/weaktr/scenes_cam.py:runlocal", "weaktr_cam", *weaktr),
        "weaktr_scratch": job("configs/weaktr/scenes_cam.py:runlocal", "weaktr_cam_scratch", scratch, *weaktr),
        "pseudo": pseudo,
        "stage2": job("configs/weaktr/scenes_seg.py:runlocal,linear", "weaktr_seg",
                      f"data.pseudo_labels_dir={out / 'pseudo'}", *seg),
    }


def result_of(workdir: pathlib.Path) -> dict:
    for name in ("eval.json", "report.json"):
        if (workdir / name).is_file():
            result = json.loads((workdir / name).read_text())
            return {k: v for k, v in result.items() if k not in ("per_class_iou", "cam_miou_curve", "thresholds")}
    return {}


def run(name: str, command: list[str], out: pathlib.Path, env: dict) -> dict:
    load_before, start = os.getloadavg()[0], time.time()
    log = (out / f"{name}.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    log.close()
    workdir = pathlib.Path(command[command.index("--workdir") + 1] if "--workdir" in command
                           else command[command.index("--out_dir") + 1])
    record = {"run": name, "command": " ".join(command), "status": os.waitstatus_to_exitcode(status),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "wall_s": round(time.time() - start, 1),
              "load_before": load_before, "load_after": os.getloadavg()[0], "result": result_of(workdir)}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--runs", nargs="+", default=["build", "eomt", "eomt_scratch", "weaktr", "pseudo", "stage2"])
    for part in ("eomt", "weaktr", "seg"):
        parser.add_argument(f"--set_{part}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"an override for the {part} runs")
    parser.add_argument("--dataset", default="jaxseg_scenes/64px-400-48-seed0-hue0.03-sat0.5-0.9",
                        help="the scenes build of the WeakTr runs, for the pseudo-labels (default: the colour-coded "
                             "scenes of configs/weaktr/scenes_cam.py)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAXSEG_CACHE_DIR=str(args.out / "cache"), JAX_PLATFORMS="cpu")
    commands = runs(args.out, args.set_eomt, args.set_weaktr, args.set_seg, args.dataset)
    unknown = sorted(set(args.runs) - set(commands))
    if unknown:
        parser.error(f"unknown runs {unknown}; valid: {sorted(commands)}")
    for name in args.runs:
        run(name, commands[name], args.out, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
