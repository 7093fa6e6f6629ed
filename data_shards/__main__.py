"""Entry point: ``python -m data_shards COMMAND [ARGS]`` with COMMAND one of synth, build, inspect, bench, concepts,
filter."""

import importlib
import sys

# One explicit table: command name -> module holding ``main(argv) -> int``.
COMMANDS = {
    "synth": "data_shards.synth",
    "build": "data_shards.build",
    "inspect": "data_shards.inspect",
    "bench": "data_shards.bench",
    "concepts": "data_shards.concepts",
    "filter": "data_shards.filter",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: python -m data_shards {{{names}}} [--help | ARGS]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose one of {names}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
