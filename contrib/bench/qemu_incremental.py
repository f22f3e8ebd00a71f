#!/usr/bin/python3
"""The QEMU way of extracting changed blocks (anchor for benches/bench).

    qemu_incremental.py SOCKET BITMAP OUTPUT

SOCKET is a qemu-nbd (or qemu-storage-daemon NBD) export started with `-B BITMAP`. The script
walks the export with NBD_CMD_BLOCK_STATUS on `qemu:dirty-bitmap:BITMAP`, reads every dirty
extent and writes it at its offset into OUTPUT, a sparse file of the export's size (as a
pull-mode backup client does), or into a device such as /dev/null. Prints "EXTENTS BYTES". Needs python3-libnbd (Debian:
`apt-get install python3-libnbd`; it installs into /usr/bin/python3).
"""
import os
import stat
import sys

import nbd

MAX_STATUS = 1 << 30  # bytes asked per block-status request
MAX_READ = 32 << 20  # qemu-nbd's maximum request size


def main():
    sock, bitmap, out = sys.argv[1:4]
    ctx = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_unix(sock)
    if not h.can_meta_context(ctx):
        sys.exit(f"server does not export {ctx}")
    size = h.get_size()
    dirty = []
    pos = [0]

    def extent(metacontext, offset, entries, err):
        if metacontext != ctx:
            return 0
        o = offset
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if flags & 1:
                if dirty and dirty[-1][0] + dirty[-1][1] == o:
                    dirty[-1][1] += length
                else:
                    dirty.append([o, length])
            o += length
        pos[0] = o
        return 0

    off = 0
    while off < size:
        pos[0] = off
        h.block_status(min(size - off, MAX_STATUS), off, extent)
        if pos[0] <= off:
            sys.exit(f"no block-status progress at {off}")
        off = min(pos[0], size)

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not /dev/null
            os.ftruncate(fd, size)
        total = 0
        for o, length in dirty:
            length = min(length, size - o)
            end = o + length
            while o < end:
                n = min(MAX_READ, end - o)
                buf = h.pread(n, o)
                os.pwrite(fd, buf, o)
                o += n
                total += n
    finally:
        os.close(fd)
    h.shutdown()
    print(len(dirty), total)


if __name__ == "__main__":
    main()
