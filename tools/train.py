"""Trains a model from an ml_collections config.

    python tools/train.py --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg'")
    parser.add_argument("--workdir", required=True, help="directory for checkpoints and logs")
    args = parser.parse_args(argv)
    print("jaxseg: training is not yet available in this version: the generic trainer and the configs "
          "land in a later release. Nothing was run and nothing was written to "
          f"{args.workdir!r}. What works today: the models (EoMT, WeakTr, Segmenter), their losses, "
          "inference and metrics, the weight converters (tools/convert_weights.py) and the scenes "
          "dataset (tools/make_dataset.py scenes --data_dir DIR).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
