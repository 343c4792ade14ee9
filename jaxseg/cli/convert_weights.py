"""Converts a local timm / DeiT / DINOv2 / DINOv3 ViT checkpoint, an EoMT checkpoint (official or
transformers, over DINOv2 or DINOv3), an official WeakTr / MCTformer-V2 stage-1 checkpoint, or an official
Segmenter or WeakTr stage-2 checkpoint, to jaxseg params.

    jaxseg-convert --input vit_small_patch14_reg4_dinov2.safetensors \\
        --output dinov2_s.msgpack --patch-size 16 --image-size 640
    jaxseg-convert --input WeakTr_checkpoint_best_mIoU.pth --output weaktr.msgpack
    jaxseg-convert --input seg_small_mask/checkpoint.pth --output seg_small_mask.msgpack
    jaxseg-convert --input clip-vit-base-patch16/model.safetensors --output clip_b16.msgpack
    jaxseg-convert --input deit_small_patch16_224-cd65a155.pth \\
        --output deit_s_cls20.msgpack --num-cls-tokens 20 --no-final-norm
    (or: python tools/convert_weights.py ...)

    jaxseg-convert --input dinov3_vitl16_pretrain_lvd1689m.pth --output dinov3_l16.msgpack
    jaxseg-convert --input coco_panoptic_eomt_large_640_dinov3.bin --base dinov3_vitl16_pretrain_lvd1689m.pth \
        --num-query-blocks 4 --output eomt_l_640_dinov3.msgpack

The third is WeakTr's stage-1 initialisation (configs/weaktr/voc_cam.py, init_checkpoint=): DeiT-S
with its class token and that token's position entry repeated once per class, without the final norm
that stage 1 never applies. The last two are DINOv3: its backbone, and an official DINOv3 EoMT
checkpoint, which is published as the difference from that backbone (--base gives the backbone;
--absolute reads a checkpoint saved with full weights instead).

Input: .safetensors, or .pth/.pt/.bin (read with torch.load(weights_only=True); needs torch). A file
that cannot be read, or that holds NaN or Inf weights, is refused.
Layout (--layout, detected by default): "timm" (a ViT, see jaxseg.convert.from_timm), "dinov3" (a DINOv3
ViT in transformers', the official or timm's names: jaxseg.convert.dinov3.from_dinov3), "eomt" (an EoMT
network: tue-mps/eomt's `q.weight` layout, or transformers' with --hf-config, see
jaxseg.convert.eomt), "weaktr" (jaxseg.convert.from_official_weaktr: C class tokens, a conv `head`,
the AAF) or "segmenter" (jaxseg.convert.from_official_segmenter: `encoder.` and `decoder.` names, a linear
or mask-transformer decoder; rstrudel/segmenter and WeakTr stage 2) or "clip" (a CLIP with a ViT image
tower in OpenAI / open_clip or transformers names, for CLIP-ES: jaxseg.convert.from_clip).
Output: a .msgpack file, or any other name for an orbax directory (ViT params only); see
jaxseg.convert.params_io. An EoMT, WeakTr or Segmenter output holds that network's keyword arguments as
its config and serves as train.init_checkpoint with train.init_into="" (the whole model).
"""
import argparse
import sys

import jax
import numpy as np

from jaxseg import cli
from jaxseg.convert import (
    from_clip,
    from_dinov3,
    from_hf_eomt,
    from_official_eomt,
    from_official_segmenter,
    from_official_weaktr,
    from_timm,
    load_state_dict,
)
from jaxseg.convert.clip import detect_layout as detect_clip
from jaxseg.convert.dinov3 import detect_layout as detect_dinov3
from jaxseg.convert.params_io import FORMATS, format_for, save_params
from jaxseg.convert.timm import DEFAULT_IGNORE


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        return values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return values


LAYOUTS = ("timm", "dinov3", "eomt", "weaktr", "segmenter", "clip")
# The layouts whose output is a whole network, which orbax directories (read back as a ViT) cannot hold.
NETWORK_LAYOUTS = ("eomt", "weaktr", "segmenter", "clip")


def detect_layout(state_dict) -> str:
    """"clip" for CLIP's names, "segmenter" for a Segmenter's `encoder.` and `decoder.` names, "eomt" for an
    EoMT query embedding, "weaktr" when the head is WeakTr's 3x3 CAM convolution (a timm classifier head is a
    Linear), "dinov3" for DINOv3's names, else "timm"."""
    try:
        detect_clip(state_dict)
        return "clip"
    except cli.UserError:
        pass
    if all(any(k.startswith(prefix) for k in state_dict) for prefix in ("encoder.", "decoder.")):
        return "segmenter"
    if any(k.endswith(("q.weight", "query.weight")) and "encoder." not in k and "attention" not in k
           for k in state_dict):
        return "eomt"
    head = state_dict.get("head.weight")
    if head is not None and head.ndim == 4:
        return "weaktr"
    try:
        detect_dinov3(state_dict)
        return "dinov3"
    except cli.UserError:
        return "timm"


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--input", required=True, help="state dict file")
    parser.add_argument("--output", required=True, help="output .msgpack file or orbax directory")
    parser.add_argument("--format", choices=FORMATS, help="default: from the output name")
    parser.add_argument("--layout", choices=LAYOUTS, help="checkpoint layout (default: detected)")
    parser.add_argument("--patch-size", type=int, help="resample the patch kernel to this size")
    parser.add_argument("--image-size", type=_size, help="resample the position embedding for N or HxW")
    parser.add_argument("--posemb-grid", type=_size, help="resample the position embedding to a grid")
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument("--no-posemb-prefix", dest="posemb_covers_prefix", action="store_false",
                        default=None, help="fold class/register position entries into the tokens")
    prefix.add_argument("--posemb-prefix", dest="posemb_covers_prefix", action="store_true",
                        help="give the position embedding (zero) entries for class/register tokens")
    parser.add_argument("--num-heads", type=int, help="needed for non-standard widths")
    parser.add_argument("--num-cls-tokens", type=int, metavar="C",
                        help="repeat the single class token (and its position entry) C times, as WeakTr "
                             "initialises its C class tokens from DeiT (timm layout)")
    parser.add_argument("--no-final-norm", dest="final_norm", action="store_false", default=None,
                        help="drop the final norm weights (timm layout; WeakTr stage 1 never applies it)")
    parser.add_argument("--source-grid", type=_size, help="grid of a non-square source posemb")
    parser.add_argument("--ignore", action="append", default=list(DEFAULT_IGNORE),
                        help="regex of state-dict names to drop (repeatable, timm layout); default: heads")
    eomt = parser.add_argument_group("EoMT checkpoints (--layout eomt)")
    eomt.add_argument("--num-query-blocks", type=int,
                      help="L2, the blocks that see the queries (not stored in official checkpoints): 3 for "
                           "ViT-S/B, 4 for L, 5 for g")
    eomt.add_argument("--base", help="the DINOv3 backbone file that an official DINOv3 EoMT checkpoint's "
                                     "differences are added to")
    eomt.add_argument("--absolute", action="store_true",
                      help="the DINOv3 EoMT checkpoint holds full weights (saved with delta_weights False)")
    eomt.add_argument("--hf-config", help="config.json of a transformers EoMT checkpoint")
    clip = parser.add_argument_group("CLIP checkpoints (--layout clip; --num-heads is the image tower's)")
    clip.add_argument("--text-num-heads", type=int, help="the text tower's heads (default: width / 64, OpenAI's)")
    clip.add_argument("--mlp-type", choices=("quick_gelu", "gelu"),
                      help="MLP activation (default quick_gelu, OpenAI's; gelu for open_clip's non-quickgelu models)")
    segmenter = parser.add_argument_group("Segmenter checkpoints (--layout segmenter)")
    segmenter.add_argument("--decoder-heads", type=int,
                           help="the mask transformer's heads (not stored; default: width / 64, as the official "
                                "create_decoder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def convert(args) -> int:
    overrides = {k: v for k, v in dict(
        patch_size=args.patch_size, image_size=args.image_size, posemb_grid=args.posemb_grid,
        posemb_covers_prefix=args.posemb_covers_prefix, num_heads=args.num_heads,
        num_cls_tokens=args.num_cls_tokens, final_norm=args.final_norm).items() if v is not None}
    state_dict = load_state_dict(args.input)
    layout = args.layout or detect_layout(state_dict)
    if layout != "eomt" and (args.base or args.absolute or args.hf_config or args.num_query_blocks):
        raise cli.UserError(f"--base, --absolute, --hf-config and --num-query-blocks are for EoMT checkpoints; "
                            f"{args.input} is a {layout} checkpoint")
    if layout != "clip" and (args.text_num_heads or args.mlp_type):
        raise cli.UserError(f"--text-num-heads and --mlp-type are for CLIP checkpoints; {args.input} is a {layout} "
                            f"checkpoint")
    if layout != "segmenter" and args.decoder_heads is not None:
        raise cli.UserError(f"--decoder-heads is for Segmenter checkpoints; {args.input} is a {layout} checkpoint")
    if layout in ("weaktr", "segmenter") and {"num_cls_tokens", "final_norm"} & set(overrides):
        raise cli.UserError(f"--num-cls-tokens and --no-final-norm are for timm-layout ViTs: a {layout} checkpoint "
                            f"fixes its class tokens and whether it has a final norm")
    if layout in NETWORK_LAYOUTS and (args.format or format_for(args.output)) != "msgpack":
        raise cli.UserError(f"a {layout} output must be a .msgpack file: orbax directories are read back as "
                            f"plain ViT params")
    if layout == "eomt":
        config, params = _convert_eomt(args, state_dict, overrides)
    elif layout == "dinov3":
        config, params = from_dinov3(state_dict, **overrides)
    elif layout == "weaktr":
        config, params = from_official_weaktr(state_dict, source_grid=args.source_grid, **overrides)
    elif layout == "clip":
        config, params = _convert_clip(args, state_dict, overrides)
    elif layout == "segmenter":
        config, params = from_official_segmenter(state_dict, decoder_heads=args.decoder_heads,
                                                 source_grid=args.source_grid, **overrides)
    else:
        config, params = from_timm(state_dict, ignore=args.ignore, source_grid=args.source_grid, **overrides)
    path = save_params(args.output, config, params, args.format, overwrite=args.overwrite)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {path} ({layout} layout, {count / 1e6:.2f}M parameters)")
    print("model config: " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())))
    return 0


def _convert_clip(args, state_dict, overrides):
    unsupported = sorted(set(overrides) - {"num_heads"})
    if unsupported:
        raise cli.UserError(f"a CLIP checkpoint converts as it is (its position embedding is resampled at each "
                            f"image size): {', '.join('--' + k.replace('_', '-') for k in unsupported)} do not apply")
    options = dict(vision_num_heads=args.num_heads, text_num_heads=args.text_num_heads, mlp_type=args.mlp_type)
    return from_clip(state_dict, **{k: v for k, v in options.items() if v is not None})


def _convert_eomt(args, state_dict, overrides):
    if args.hf_config:
        if args.base or args.absolute:
            raise cli.UserError("--base and --absolute are for official (tue-mps/eomt) checkpoints; a "
                                "transformers checkpoint holds full weights")
        return from_hf_eomt(state_dict, cli.read_json(args.hf_config, "--hf-config"), **overrides)
    if any(k.endswith("class_predictor.weight") for k in state_dict):
        raise cli.UserError(f"{args.input} is a transformers EoMT checkpoint: give its config.json with "
                            f"--hf-config")
    if args.num_query_blocks is None:
        raise cli.UserError("an official EoMT checkpoint does not store L2, the number of blocks that see "
                            "the queries: give --num-query-blocks (3 for ViT-S/B, 4 for L, 5 for g)")
    base = load_state_dict(args.base) if args.base else None
    return from_official_eomt(state_dict, num_query_blocks=args.num_query_blocks, base=base,
                              absolute=args.absolute, **overrides)


def main(argv=None) -> int:
    return cli.run(parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
