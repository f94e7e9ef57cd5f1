"""`python -m minqwen` and the `minqwen` command: the CLI (cli.py)."""
import sys

from .kernels import InstructionPathError


def main() -> int:
    # cli.py imports the kernels, which refuse a MINQWEN_ISA this CPU cannot run before cli.main's handler
    # of MinqwenError exists: reported here the same way, one line and exit status 2.
    try:
        from .cli import main as cli_main
    except InstructionPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
