"""Process entry point. Serving commands monkey-patch with gevent before anything else loads."""
import sys

GEVENT_COMMANDS = ("serve", "worker", "sim-engine", "bench")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in GEVENT_COMMANDS:
        from gevent import monkey

        monkey.patch_all()
    from kvrouter.cli import main as cli_main

    cli_main()
