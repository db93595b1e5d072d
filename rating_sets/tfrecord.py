"""
TFRecord files of tf.train.Example protobufs, read without TensorFlow or protobuf.

Framing of one record (all integers little-endian):
    uint64 length | uint32 masked crc32c(length bytes) | data[length] | uint32 masked crc32c(data)
masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8, modulo 2**32. Both checksums are verified (a
corrupt or truncated frame is an error naming the file and the row, that is the record, counted
from 0); crc32c comes from the `crc32c` or `google_crc32c` package when one is installed, else from
the pure-Python table below (some MB/s: a few minutes for RichHF-18K's heatmap-laden records;
verify=False skips it).

The payload is decoded with the few messages of tensorflow/core/example/{example,feature}.proto:
    Example { Features features = 1; }
    Features { map<string, Feature> feature = 1; }    (map entry: string key = 1; Feature value = 2)
    Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }
Packed and unpacked repeated fields are both read (a parser must accept either); unknown fields
are skipped by their wire type.
"""

import struct

# -----------------------------------------------------------------------------
# crc32c (Castagnoli), reflected polynomial 0x82F63B78

def _table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _table()


def _crc32c_py(data):
    c = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _fast_crc32c():
    # an installed C implementation, when there is one (neither is a dependency)
    try:
        import crc32c
        return crc32c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c
        return lambda data: google_crc32c.value(bytes(data))
    except ImportError:
        return None


crc32c = _fast_crc32c() or _crc32c_py


def masked_crc(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -----------------------------------------------------------------------------
# framing

def read_records(path, verify=True):
    """yield (row, payload bytes) of a TFRecord file; a bad frame is a ValueError naming file and row"""
    with open(path, "rb") as f:
        i = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path} row {i}: bad TFRecord frame: the file ends inside the 12-byte "
                                 f"header ({len(head)} bytes)")
            length, length_crc = struct.unpack("<QI", head)
            if verify and masked_crc(head[:8]) != length_crc:
                raise ValueError(f"{path} row {i}: bad TFRecord frame: the length's checksum does not match "
                                 f"(a corrupt file, or not a TFRecord file)")
            data = f.read(length)
            if len(data) < length:
                raise ValueError(f"{path} row {i}: bad TFRecord frame: the file ends inside the record "
                                 f"({len(data)} of {length} bytes)")
            foot = f.read(4)
            if len(foot) < 4:
                raise ValueError(f"{path} row {i}: bad TFRecord frame: the file ends before the record's checksum")
            if verify and masked_crc(data) != struct.unpack("<I", foot)[0]:
                raise ValueError(f"{path} row {i}: bad TFRecord frame: the record's checksum does not match")
            yield i, data
            i += 1


# -----------------------------------------------------------------------------
# protobuf wire format

def _varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf):
    """yield (field number, wire type, value) of a message: an int for varint and fixed fields, a
    memoryview slice for length-delimited ones"""
    buf = memoryview(buf)
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated 64-bit field")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError(f"length-delimited field {number} runs past the end of its message")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated 32-bit field")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _int64(u):
    # int64 is written as its two's complement in 64 bits
    return u - (1 << 64) if u >= 1 << 63 else u


def _feature(buf):
    """a Feature message -> list of bytes, floats or ints (empty for a feature with no kind set)"""
    values = []
    for number, wire, value in _fields(buf):
        if wire != 2 or number not in (1, 2, 3):
            continue  # unknown field
        for n, w, v in _fields(value):
            if n != 1:
                continue
            if number == 1 and w == 2:  # BytesList
                values.append(bytes(v))
            elif number == 2 and w == 5:  # FloatList, unpacked
                values.append(struct.unpack("<f", v)[0])
            elif number == 2 and w == 2:  # FloatList, packed
                if len(v) % 4:
                    raise ValueError("packed float list whose length is not a multiple of 4")
                values.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif number == 3 and w == 0:  # Int64List, unpacked
                values.append(_int64(v))
            elif number == 3 and w == 2:  # Int64List, packed
                pos = 0
                while pos < len(v):
                    u, pos = _varint(v, pos)
                    values.append(_int64(u))
            else:
                raise ValueError(f"value of wire type {w} in a {('bytes', 'float', 'int64')[number - 1]} list")
    return values


def parse_example(buf):
    """a serialized tf.train.Example -> {feature name: list of values}"""
    features = {}
    for number, wire, value in _fields(buf):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(value):  # Features.feature: map entries
            if n != 1 or w != 2:
                continue
            key, feat = None, b""
            for en, ew, ev in _fields(entry):
                if en == 1 and ew == 2:
                    key = bytes(ev).decode("utf-8")
                elif en == 2 and ew == 2:
                    feat = ev
            if key is None:
                raise ValueError("a feature map entry without a key")
            features[key] = _feature(feat)
    return features


def read_examples(path, verify=True):
    """yield (row, {feature: values}) of a TFRecord file of tf.train.Example"""
    for i, data in read_records(path, verify=verify):
        try:
            yield i, parse_example(data)
        except ValueError as e:
            raise ValueError(f"{path} row {i}: bad tf.train.Example ({e})") from None
