"""The image size a compressed DICOM frame claims in its own codestream, read without decoding it.

A JPEG, JPEG-LS or JPEG 2000 decoder allocates what the codestream's header
says, whatever the DICOM header says: a 512 x 512 slice whose frame claims
65535 x 65535 pixels would take gigabytes. `frame_size` reads the height and
width from the frame's start-of-frame (JPEG, JPEG-LS) or SIZ (JPEG 2000,
HTJ2K, also inside a JP2 file) marker segment, so that lungsql.dicom refuses
a frame larger than its header before any decoder runs. RLE frames carry no
size: their decoder writes into a frame of the DICOM header's size.
"""

from __future__ import annotations

import struct

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless...) and JPEG-LS's SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
#: Markers without a length field.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: How far into a frame the size is looked for.
_SEARCH = 1 << 16


def frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a compressed frame's codestream claims, or None when it names no size."""
    head = bytes(frame[:_SEARCH])
    if head.startswith(_JP2_SIGNATURE):
        start = head.find(b"jp2c")
        head = head[start + 4:] if start >= 0 else b""
    if head.startswith(b"\xff\x4f\xff\x51"):
        return _siz(head)
    if head.startswith(b"\xff\xd8"):
        return _sof(head)
    return None


def _siz(head: bytes) -> tuple[int, int] | None:
    """JPEG 2000: SIZ follows SOC; the image is (Ysiz - YOsiz) x (Xsiz - XOsiz)."""
    try:
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", head, 8)
    except struct.error:
        return None
    return max(0, ysiz - yosiz), max(0, xsiz - xosiz)


def _sof(head: bytes) -> tuple[int, int] | None:
    """JPEG and JPEG-LS: walk the marker segments up to the first start-of-frame."""
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            return None
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _STANDALONE:
            offset += 2
            continue
        (length,) = struct.unpack_from(">H", head, offset + 2)
        if marker in _SOF:
            if offset + 9 > len(head):
                return None
            rows, columns = struct.unpack_from(">HH", head, offset + 5)
            return rows, columns
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None
