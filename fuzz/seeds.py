#!/usr/bin/env python3
"""Writes hand-made seeds for the nbd_server and virtio_blk fuzz targets: usage seeds.py CORPUS_DIR.

nbd_server inputs are client byte streams (handshake options, then requests); virtio_blk inputs
follow the layout documented in fuzz_targets/virtio_blk.rs.
"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
EXT_REQ = 0x21E41C71
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10, EXTENDED_HEADERS=11)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)


def option(name, data=b""):
    return struct.pack(">QII", IHAVEOPT, OPT[name], len(data)) + data


def export(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    qs = b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)
    return struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries)) + qs


def req(cmd, offset=0, length=0, flags=0, payload=b"", cookie=1):
    return struct.pack(">IHHQQI", REQ, flags, CMD[cmd], cookie, offset, length) + payload


def ext_req(cmd, offset=0, length=0, flags=0, payload=b"", cookie=1):
    return struct.pack(">IHHQQQ", EXT_REQ, flags, CMD[cmd], cookie, offset, length) + payload


def nbd_seeds():
    hello = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    io = (req("READ", 4096, 512) + req("WRITE", 0, 16, payload=b"x" * 16, cookie=2)
          + req("FLUSH", cookie=3) + req("TRIM", 8192, 4096, cookie=4)
          + req("WRITE_ZEROES", 0, 65536, flags=2, cookie=5) + req("CACHE", 0, 4096, cookie=6))
    yield "export_name", hello + option("EXPORT_NAME", b"") + io + req("DISC")
    contexts = meta("", ["base:allocation", "qemu:allocation-depth"])
    yield "structured", (hello + option("STRUCTURED_REPLY") + option("SET_META_CONTEXT", contexts)
                         + option("GO", export("", (0, 1, 2, 3))) + io
                         + req("BLOCK_STATUS", 0, 1 << 20, cookie=7)
                         + req("READ", 0, 8192, flags=4, cookie=8) + req("DISC"))
    ext_io = (ext_req("READ", 0, 4096) + ext_req("WRITE", 512, 8, flags=1, payload=b"y" * 8)
              + ext_req("BLOCK_STATUS", 0, 1 << 20, flags=8, cookie=3)
              + ext_req("WRITE_ZEROES", 0, 4096, flags=16, cookie=4) + ext_req("DISC"))
    yield "extended", (hello + option("EXTENDED_HEADERS") + option("SET_META_CONTEXT", contexts)
                       + option("GO", export("", (3,))) + ext_io)
    yield "list_info", (hello + option("LIST") + option("INFO", export("ro", (1, 2)))
                        + option("LIST_META_CONTEXT", meta("", ["base:", "qemu:"]))
                        + option("INFO", export("missing")) + option("ABORT"))
    yield "read_only", (hello + option("GO", export("ro")) + req("WRITE", 0, 4, payload=b"abcd")
                        + req("READ", 60 << 10, 8192, cookie=2) + req("DISC"))


DATA = 0x1000
NEXT, WRITE, INDIRECT = 1, 2, 4


def chain_input(descs, heads, memory, read_only=False):
    out = bytes([1 if read_only else 0, len(descs)])
    for addr, length, flags, nxt in descs:
        out += struct.pack("<IIHH", addr, length, flags, nxt)
    out += bytes([len(heads)]) + b"".join(struct.pack("<H", h) for h in heads)
    mem = bytearray()
    for addr, blob in memory:
        at = addr - DATA
        if len(mem) < at + len(blob):
            mem.extend(b"\0" * (at + len(blob) - len(mem)))
        mem[at:at + len(blob)] = blob
    return out + bytes(mem)


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def virtio_seeds():
    IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
    three = [(0x1000, 16, NEXT, 1), (0x2000, 1024, NEXT | WRITE, 2), (0x3000, 1, WRITE, 0)]
    yield "read", chain_input(three, [0], [(0x1000, blk_header(IN, 3))])
    out = [(0x1000, 16, NEXT, 1), (0x2000, 1024, NEXT, 2), (0x3000, 1, WRITE, 0)]
    yield "write", chain_input(out, [0], [(0x1000, blk_header(OUT, 7)), (0x2000, b"\x5a" * 1024)])
    yield "write_ro", chain_input(out, [0], [(0x1000, blk_header(OUT, 7))], read_only=True)
    two = [(0x1000, 16, NEXT, 1), (0x3000, 1, WRITE, 0)]
    yield "flush", chain_input(two, [0], [(0x1000, blk_header(FLUSH, 0))])
    get_id = [(0x1000, 16, NEXT, 1), (0x2000, 20, NEXT | WRITE, 2), (0x3000, 1, WRITE, 0)]
    yield "get_id", chain_input(get_id, [0], [(0x1000, blk_header(GET_ID, 0))])
    seg = [(0x1000, 16, NEXT, 1), (0x2000, 16, NEXT, 2), (0x3000, 1, WRITE, 0)]
    for name, kind, flags in (("discard", DISCARD, 0), ("write_zeroes", WRITE_ZEROES, 1)):
        yield name, chain_input(seg, [0], [(0x1000, blk_header(kind, 0)),
                                           (0x2000, struct.pack("<QII", 8, 16, flags))])
    table = b"".join(struct.pack("<QIHH", *d) for d in three)
    yield "indirect", chain_input([(0x4000, len(table), INDIRECT, 0)], [0],
                                  [(0x1000, blk_header(IN, 0)), (0x4000, table)])
    both = three + [(0x1100, 16, NEXT, 4), (0x5000, 4096, NEXT | WRITE, 5), (0x3001, 1, WRITE, 0)]
    yield "two_chains", chain_input(both, [0, 3], [(0x1000, blk_header(IN, 0)),
                                                  (0x1100, blk_header(IN, 100))])
    split = [(0x1000, 8, NEXT, 1), (0x1008, 8, NEXT, 2), (0x2000, 512, NEXT | WRITE, 3),
             (0x2200, 512, NEXT | WRITE, 4), (0x3000, 1, WRITE, 0)]
    yield "split_header", chain_input(split, [0], [(0x1000, blk_header(IN, 1))])


def main():
    root = sys.argv[1]
    for target, seeds in (("nbd_server", nbd_seeds()), ("virtio_blk", virtio_seeds())):
        os.makedirs(os.path.join(root, target), exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(root, target, "seed-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
