"""Socket helpers shared by the server and the upstream client."""


def send_all(sock, data) -> None:
    """Like ``sendall`` but one plain ``send`` in the common case.

    gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (one more
    syscall per response); a small response fits the socket buffer at once.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
