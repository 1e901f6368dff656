"""`kiln quantize`: quantize a model directory into a GPTQ, AWQ or compressed-tensors (W8A8)
checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `quantize` verb."""
    p = subparsers.add_parser(
        "quantize", help="quantize a model (RTN, GPTQ, AWQ, SmoothQuant, FP8)"
    )
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument(
        "--method", default="rtn", help="rtn, gptq, awq (weight-only); smoothquant, fp8 (W8A8)"
    )
    p.add_argument("--bits", type=int, default=None, help="4 or 8 (default: 4; W8A8: 8)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="input columns per scale; -1: per channel (default: 128; W8A8: per channel)",
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="sym", action="store_true", default=None, help="(default but for awq)"
    )
    sym.add_argument("--asym", dest="sym", action="store_false", help="with a zero point (awq)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by Hessian diagonal")
    p.add_argument(
        "--calib", default=None, metavar="FILE", help="calibration text (GPTQ, AWQ, SmoothQuant)"
    )
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument(
        "--alpha", type=float, default=None, help="SmoothQuant's migration strength (0.5)"
    )
    p.add_argument(
        "--device", default=None, help="where calibration and the algorithms run (default: cpu)"
    )
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
        alpha=args.alpha,
        device=args.device,
        progress=True,
    )
    print(f"wrote {out}")
