"""`megatron-rlvr convert --from hf|mcore --to hf|mcore [--tp N --pp M] SRC DST` and
`megatron-rlvr convert --from gguf --to hf [--dtype float32|bfloat16] SRC.gguf DST`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src_format", choices=("hf", "mcore", "gguf"), required=True,
                        help="format of SRC: a HF safetensors directory, a megatron-rlvr checkpoint or a GGUF file")
    parser.add_argument("--to", dest="dst_format", choices=("hf", "mcore"), required=True, help="format of DST")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of a megatron output")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size of a megatron output")
    parser.add_argument("--pp-first-layers", type=int, default=None,
                        help="layers on the first pipeline stage of a megatron output (default: the even share)")
    parser.add_argument("--pp-last-layers", type=int, default=None,
                        help="layers on the last pipeline stage of a megatron output (default: the even share)")
    parser.add_argument("--pad-vocab-multiple", type=int, default=128,
                        help="pad the vocab to a multiple of this x TP (HF -> mcore)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weight dtype of the HF output of a GGUF conversion (GGUF tensors dequantize to float32)")
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("dst", metavar="DST")


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.models import convert, gguf

    split = {"first_stage_layers": args.pp_first_layers, "last_stage_layers": args.pp_last_layers}
    if args.src_format == "gguf" and args.dst_format != "hf":
        print("convert: a GGUF file converts to hf (--to hf); convert that to mcore next", file=sys.stderr)
        return 2
    try:
        if args.src_format == "gguf":
            gguf.gguf_to_hf(args.src, args.dst, args.dtype)
            print(f"converted {args.src} (gguf) -> {args.dst} (hf, {args.dtype})")
            return 0
        if args.src_format == "hf" and args.dst_format == "mcore":
            convert.hf_to_mcore(args.src, args.dst, args.tp, args.pp, args.pad_vocab_multiple, **split)
        elif args.src_format == "mcore" and args.dst_format == "mcore":
            convert.reshard(args.src, args.dst, args.tp, args.pp, **split)
        elif args.src_format == "mcore" and args.dst_format == "hf":
            convert.mcore_to_hf(args.src, args.dst)
        else:
            print("convert: --from hf --to hf is a copy; nothing to convert", file=sys.stderr)
            return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 1
    print(f"converted {args.src} ({args.src_format}) -> {args.dst} ({args.dst_format}, tp={args.tp}, pp={args.pp})")
    return 0
