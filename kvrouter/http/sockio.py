"""Socket and descriptor helpers shared by the server, the upstream client and the sim."""
import logging
import resource

log = logging.getLogger("kvrouter.http")
NOFILE_CAP = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (capped at 1,048,576, as the seed
    does); systemd user services start with 1,024, about 500 concurrent streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, err)
    return soft


def send_all(sock, data) -> None:
    """Like ``sendall`` but one plain ``send`` in the common case.

    gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (one more
    syscall per response); a small response fits the socket buffer at once.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
