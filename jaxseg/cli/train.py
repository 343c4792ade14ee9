"""Trains and evaluates a model from a config file.

    jaxseg-train --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes
    (or: python tools/train.py ...)

The workdir holds the checkpoints (a rerun resumes from the latest usable one), config.json,
train_metrics.jsonl, TensorBoard events, eval.json and, for the generated-scenes configs, the dataset
build (unless config.data.data_dir names another place). Override config values with --set key=value
(e.g. --set train.total_steps=50); --print_config prints the resolved config and exits; the keys are
listed in docs/config.md (or --help_config). A rerun that is rejected (a setting that does not fit the run's checkpoint)
leaves the workdir as it was.
Multi-host: run the same command on every host; the coordinator comes from the cluster (TPU pod,
SLURM, Open MPI) or from JAXSEG_COORDINATOR / JAXSEG_NUM_PROCESSES / JAXSEG_PROCESS_ID.
"""
import json
import sys

from jaxseg import cli


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--config", help="config file, optionally with ':arg'")
    parser.add_argument("--workdir", help="directory for checkpoints, logs and results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config (after --set) as JSON and exit")
    parser.add_argument("--help_config", action="store_true",
                        help="print the reference of every config key (docs/config.md) and exit")
    return parser


def train(args) -> int:
    from jaxseg import parallel
    from jaxseg.config import apply_overrides, load_config

    if args.help_config:
        from jaxseg.cli.config_reference import reference

        print(reference(), end="")
        return 0
    if not args.config:
        raise cli.UserError("--config is required (only --help_config runs without it)")
    config = load_config(args.config)
    apply_overrides(config, args.set)
    if args.print_config:
        print(config.to_json(indent=1))
        return 0
    if not args.workdir:
        raise cli.UserError("--workdir is required to train (only --print_config runs without it)")
    from jaxseg.train.main import train_and_evaluate

    parallel.initialize()  # multi-host runs join here (see jaxseg/parallel.py); else a no-op
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps({name: {k: v for k, v in values.items() if k != "per_class_iou"} if isinstance(values, dict)
                      else values for name, values in result.items()}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
