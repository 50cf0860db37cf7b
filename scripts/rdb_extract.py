#!/usr/bin/env python3
"""Extract character vectors from an R lazy-load database (`Rdata.rdb` + `Rdata.rdx`) without R.

Used once to extract two public-domain novels from Debian's `r-cran-janeaustenr` (1.0.0-1) into data/texts/:

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_1.0.0-1_all.deb x
    python3 scripts/rdb_extract.py x/usr/lib/R/site-library/janeaustenr/data/Rdata OUT prideprejudice sensesensibility

The index (`.rdx`) is a gzip'd serialized R list whose `variables` element maps each name to (offset, length) in the
`.rdb`; there every object is a 4-byte big-endian length followed by a zlib stream of R's XDR serialization
(format 2 or 3). Only the types these files use are read: NULL, symbols, pairlists, strings, logical/integer/real and
generic vectors, and references to earlier symbols. Each novel is a character vector of lines; it is written with one
line per element ("\n"-joined), NA elements as empty lines.
"""
import gzip
import struct
import sys
import zlib

NILVALUE, REF, CHAR, SYM, LIST, LGL, INT, REAL, STR, VEC = 254, 255, 9, 1, 2, 10, 13, 14, 16, 19
SPECIAL = {242, 241, 253, 252, 251, 247}  # environments and markers that carry no payload


class Reader:
    def __init__(self, data):
        self.b, self.i, self.refs = data, 0, []

    def int(self):
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def bytes(self, n):
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def header(self):
        if self.bytes(2) != b"X\n":
            raise ValueError("not an XDR serialization")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self.bytes(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE or kind in SPECIAL:
            return None
        if kind == REF:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if kind == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LIST:
            out = {}
            while True:
                attr = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == NILVALUE:
                    return out
                if kind != LIST:
                    raise ValueError(f"pairlist tail of type {kind}")
        if kind == CHAR:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", "replace")
        if kind in (LGL, INT):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == REAL:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (STR, VEC):
            value = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"unsupported SEXP type {kind}")
        attrs = self.item() if has_attr else None
        if attrs and "names" in attrs and kind == VEC:
            return dict(zip(attrs["names"], value))
        return value


def unserialize(data):
    r = Reader(data)
    r.header()
    return r.item()


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: rdb_extract.py PREFIX OUT_DIR NAME...")
    prefix, out_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    index = unserialize(gzip.open(prefix + ".rdx").read())
    with open(prefix + ".rdb", "rb") as f:
        db = f.read()
    for name in names:
        offset, length = index["variables"][name]
        blob = db[offset:offset + length]
        lines = unserialize(zlib.decompress(blob[4:]))
        with open(f"{out_dir}/{name}.txt", "w", encoding="utf-8") as out:
            out.write("\n".join(line or "" for line in lines) + "\n")
        print(f"{name}: {len(lines)} lines")


if __name__ == "__main__":
    main()
