"""A SLIM app that waits to be invited into group channels, as a real participant would.

  python slim_member.py NODE_ENDPOINT org/ns/name

Prints "instance <uuid>" once connected, "joined" when an invite arrives, and "received <text>"
for every message on the channel. Reads commands on stdin: "publish <text>" publishes to the
channel it joined.
"""
import datetime
import sys
import threading

from slim_app import connect

_lock = threading.Lock()


def say(*words) -> None:
    """One whole line per call, whichever thread prints (print() writes its parts separately)."""
    with _lock:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()


def main(endpoint: str, local: str, commands=None) -> None:
    app, _ = connect(endpoint, local)
    sessions = []

    def receive(session) -> None:
        while True:
            try:
                msg = session.get_message(datetime.timedelta(seconds=3600))
            except Exception as error:  # noqa: BLE001 - closed sessions end the loop
                say("closed", error)
                return
            say("received", msg.payload.decode())

    def accept() -> None:
        while True:
            session = app.listen_for_session(None)
            sessions.append(session)
            say("joined")
            threading.Thread(target=receive, args=(session,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    for line in sys.stdin if commands is None else commands:
        command, _, text = line.strip().partition(" ")
        if command == "publish" and sessions:
            try:
                sessions[-1].publish_and_wait(text.encode(), None, None)
                say("published", text)
            except Exception as error:  # noqa: BLE001
                say("error", error)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
