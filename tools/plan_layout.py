"""Layout planner: same as `megatron-rlvr plan`."""

import argparse
import sys

from megatron_rlvr.commands import plan

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=plan.__doc__.splitlines()[0])
    plan.add_arguments(parser)
    sys.exit(plan.run(parser.parse_args()))
