"""`python -m leanseq.energy [--device cuda] [--energy-backend ...]`: print the method a Meter would use and why."""

import argparse
import sys

from leanseq.energy import Meter, add_cli_arguments, meter_kwargs_from_args
from leanseq.energy.backends import EnergyBackendError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanseq.energy", description=__doc__)
    parser.add_argument("--device", default=None, help="where the metered work runs: cpu (default), cuda, cuda:N")
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    try:
        meter = Meter(device=args.device, **meter_kwargs_from_args(args))
    except (EnergyBackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"backend: {meter.backend_name}\nmethod:  {meter.method}\nwhy:     {meter.backend_reason}")
    print(f"grid:    {meter.grid_intensity:g} gCO2e/kWh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
