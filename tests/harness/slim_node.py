"""Runs a real SLIM node (data plane + controller API) in-process from a YAML config.

Usage: python slim_node.py CONFIG.yaml
Prints "ready" once the node's servers are up, then runs until killed.
"""
import sys
import time

import slim_bindings


def main() -> None:
    slim_bindings.initialize_from_config(sys.argv[1])
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
