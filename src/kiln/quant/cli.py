"""`kiln quantize`: quantize a model directory's weights into a GPTQ or AWQ checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `quantize` verb."""
    p = subparsers.add_parser("quantize", help="quantize a model's weights (RTN, GPTQ or AWQ)")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--method", default="rtn", help="rtn, gptq or awq (smoothquant, fp8: not yet)")
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (default: 4)")
    p.add_argument(
        "--group-size", type=int, default=128, help="input columns per scale; -1: per channel"
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="sym", action="store_true", default=None, help="(default but for awq)"
    )
    sym.add_argument("--asym", dest="sym", action="store_false", help="with a zero point (awq)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by Hessian diagonal")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration text (GPTQ, AWQ)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sample")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from kiln.quant.quantize import quantize

    out = quantize(
        args.model,
        args.out,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        progress=True,
    )
    print(f"wrote {out}")
