#!/usr/bin/env python3
"""Fills the private Redis with the keys redis-benchmark -r ROWS will ask for.

redis-benchmark -r N replaces __rand_int__ with a 12-digit zero-padded number in 0..N-1, and its
GET/SET tests use "key:__rand_int__"; values are -d 1024 bytes of "x". Seeding every key makes
the GET run all hits, like the sidecar's and pgbench's. Python stdlib only: raw RESP, pipelined.

usage: redis_seed.py PORT [ROWS] [VALUE_BYTES]
"""
import socket
import sys


def main() -> int:
    port = int(sys.argv[1])
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    value = b"x" * size
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = sock.makefile("rb")
    chunk = 1000
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        out = bytearray()
        for i in range(start, end):
            key = b"key:%012d" % i
            out += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value)
        sock.sendall(out)
        for _ in range(start, end):
            reply = f.readline()
            if reply != b"+OK\r\n":
                print(f"redis_seed: unexpected reply {reply!r}", file=sys.stderr)
                return 1
    sock.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
    reply = f.readline().strip()
    print(int(reply[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
