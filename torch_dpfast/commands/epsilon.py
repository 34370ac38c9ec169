"""``dpfast epsilon``: epsilon from (sigma, q, steps, delta), or sigma for a target epsilon."""

from __future__ import annotations

from .. import accounting
from . import UsageError


def add_arguments(parser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma", type=float, help="noise multiplier: report epsilon")
    what.add_argument("--target-epsilon", type=float, help="report the sigma that reaches it")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--sample-rate", type=float, help="q, the Poisson sampling probability")
    rate.add_argument("--batch-size", type=int, help="expected batch size (with --dataset-size)")
    parser.add_argument("--dataset-size", type=int, help="N, with --batch-size: q = B / N")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=float, help="epochs of round(1/q) steps")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.batch_size is not None:
        if args.dataset_size is None:
            raise UsageError("--batch-size needs --dataset-size (q = batch size / dataset size)")
        if not 0 < args.batch_size <= args.dataset_size:
            raise UsageError("--batch-size must be in [1, --dataset-size]")
        q = args.batch_size / args.dataset_size
        if 0 < args.delta < 1:
            accounting.warn_large_delta(args.delta, args.dataset_size, stacklevel=2)
    else:
        q = args.sample_rate
    try:
        steps = accounting.calibration.steps_for(q, args.steps, args.epochs)
        if args.sigma is not None:
            eps = accounting.compute_epsilon(
                noise_multiplier=args.sigma,
                sample_rate=q,
                steps=steps,
                delta=args.delta,
                accountant=args.accountant,
            )
            print(
                f"epsilon = {eps:.4f} at delta = {args.delta:g} "
                f"(sigma {args.sigma}, q {q:.6g}, {steps} steps, {args.accountant})"
            )
        else:
            sigma = accounting.get_noise_multiplier(
                target_epsilon=args.target_epsilon,
                target_delta=args.delta,
                sample_rate=q,
                steps=steps,
                accountant=args.accountant,
            )
            print(
                f"sigma = {sigma:.4f} reaches epsilon <= {args.target_epsilon} at delta = "
                f"{args.delta:g} (q {q:.6g}, {steps} steps, {args.accountant})"
            )
    except ValueError as error:
        raise UsageError(str(error)) from None
    return 0
