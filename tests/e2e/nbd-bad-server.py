#!/usr/bin/env python3
"""A small NBD server that misbehaves on purpose, for the e2e suite.

usage: nbd-bad-server.py SOCKET SIZE MODE

Serves SIZE bytes of RAM on the Unix socket SOCKET (fixed newstyle, NBD_OPT_GO,
simple replies only, one connection at a time, any number in a row). MODE says how
the first connection misbehaves once it has served a few requests:
  wrong-handle   the reply to a read carries a handle no request has
  garbage        16 bytes that are not a reply
  short          half a read's data, then the connection closes
Later connections behave. The data survives reconnections (it is the server's).
"""
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_EXPORT_NAME = 7, 1
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
# has flags, flush, trim, write zeroes
TFLAGS = 1 | 4 | 32 | 64


def recv_exact(c, n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b


def opt_reply(c, opt, ty, data=b""):
    c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, ty, len(data)) + data)


def handshake(c, size):
    c.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
    recv_exact(c, 4)
    while True:
        _, opt, n = struct.unpack(">QII", recv_exact(c, 16))
        data = recv_exact(c, n)
        if opt == OPT_GO:
            opt_reply(c, opt, REP_INFO, struct.pack(">HQH", 0, size, TFLAGS))
            opt_reply(c, opt, REP_ACK)
            return
        if opt == OPT_EXPORT_NAME:
            c.sendall(struct.pack(">QH", size, TFLAGS))
            return
        opt_reply(c, opt, REP_ERR_UNSUP)


def serve(c, store, mode, first):
    served = 0
    while True:
        magic, flags, ty, handle, off, ln = struct.unpack(">IHHQQI", recv_exact(c, 28))
        if magic != 0x25609513:
            return
        if ty == 2:  # DISC
            return
        payload = recv_exact(c, ln) if ty == 1 else b""
        served += 1
        misbehave = first and served > 8 and ty == 0
        if misbehave and mode == "wrong-handle":
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle ^ (1 << 40)) + bytes(store[off:off + ln]))
            continue
        if misbehave and mode == "garbage":
            c.sendall(b"HTTP/1.1 200 OK\r")
            continue
        if misbehave and mode == "short":
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle) + bytes(store[off:off + ln // 2]))
            return
        if off + ln > len(store):
            c.sendall(struct.pack(">IIQ", 0x67446698, 22, handle))
            continue
        if ty == 0:
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle) + bytes(store[off:off + ln]))
        else:
            if ty == 1:
                store[off:off + ln] = payload
            elif ty in (4, 6):
                store[off:off + ln] = bytes(ln)
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle))


def main():
    path, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = bytearray(size)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(8)
    first = True
    while True:
        c, _ = s.accept()
        try:
            handshake(c, size)
            serve(c, store, mode, first)
        except (EOFError, ConnectionError):
            pass
        finally:
            c.close()
        # The probe connection of the client is its queue's: misbehave on it.
        first = False


if __name__ == "__main__":
    main()
