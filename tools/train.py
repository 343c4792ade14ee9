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
    print("jaxseg: training is not yet available in this version: the trainer, the scenes dataset and "
          "the EoMT/WeakTr methods land in later releases. Nothing was run and nothing was written to "
          f"{args.workdir!r}. What works today: the ViT (jaxseg.models.vit) and the weight converter "
          "(tools/convert_weights.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
