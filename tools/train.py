"""Trains and evaluates a model from an ml_collections config file.

    python tools/train.py --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes

The workdir holds the checkpoints (a rerun resumes from the latest), train_metrics.jsonl, TensorBoard
events, eval.json and, for the generated-scenes configs, the dataset build (unless
config.data.data_dir names another place).
Override config values with --set key=value (e.g. --set train.total_steps=50).
Multi-host: run the same command on every host; the coordinator comes from the cluster (TPU pod,
SLURM, Open MPI) or from JAXSEG_COORDINATOR / JAXSEG_NUM_PROCESSES / JAXSEG_PROCESS_ID.
"""
import argparse
import json
import logging
import sys

from jaxseg import parallel
from jaxseg.config import apply_overrides, load_config
from jaxseg.train.main import train_and_evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg'")
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, logs and results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    parallel.initialize()  # multi-host runs join here (see jaxseg/train/distributed.py); else a no-op
    try:
        config = load_config(args.config)
        apply_overrides(config, args.set)
        result = train_and_evaluate(config, args.workdir)
    except (FileNotFoundError, NotADirectoryError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({name: {k: v for k, v in values.items() if k != "per_class_iou"} if isinstance(values, dict)
                      else values for name, values in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
