"""The ``.vqz`` container: what a compressed file holds besides the range coder's streams (:mod:`tools.codec`
makes and reads those), packed and parsed with every length and name checked.

Container layout (little-endian; ``HEADER`` below)::

    offset  size  field
    0       4     magic b"VQZ1"
    4       2     format version (5 with names below sub-folders, 4 with plain file names, else 3; all are
                  read: version 1 has no step-version byte, version 2 streams begin with no labels,
                  version 3 streams do; 5 is 4 with names that may hold "/")
    6       32    SHA-256 of the prior checkpoint
    38      32    SHA-256 of the stage-1 checkpoint
    70      2     image_size          72  1  channels
    73      2+2   grid height, width  77  4  codebook_size
    81      4     image count         85  4  batch size (images per coded batch)
    89      1     the prior's step version (`CodePrior.step_version`: the arithmetic that made the streams)
    versions 4, 5 only: 1 byte of flags (bit 0: the streams begin with labels; bit 1: names follow), then,
                  if names follow, their length L (4 bytes) and L bytes: zlib of the images' file names
                  (UTF-8, separated by NUL bytes; version 4: each a plain file name of at most 255 bytes;
                  version 5: a relative path of such names joined by "/", at most 1,024 bytes)
    90      8*nb  per batch (nb = ceil(count / batch_size)): stream length in bytes, CRC32 of its codes
    ...           the batches' range-coder streams, concatenated (32-bit little-endian words)
    end-4   4     CRC32 of every byte before it

:func:`unpack` checks every length against the bytes left before using it and the file CRC before
anything is decoded; every problem is a :class:`ContainerError` naming the file. The names block is
inflated with a bound (256 or 1,025 bytes a name), so a hostile file cannot make it expand without limit, and
every name is checked (`check_name`): none can point outside the folder `decompress` writes into.
Sub-folder names got their own version (5) so that a reader of version 4, which refuses a "/" in a name,
says to use a newer vqgen instead of calling the file corrupt; files with plain names stay version 4.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from common.cli import UserError

MAGIC = b"VQZ1"
FORMAT_VERSION = 5  # pack writes 5 for names with sub-folders, 4 for plain names; none: 3 (labels) or 2 (null)
NAMES_VERSION = 4  # the first version with names (plain file names only)
HEADER = struct.Struct("<4sH32s32sHBHHIII")  # magic .. batch size: 89 bytes, the same in every version
STEP = struct.Struct("<B")  # versions 2 to 5: the prior's step version (version 1 files: 1)
FLAGS = struct.Struct("<B")  # versions 4, 5: bit 0 labels coded, bit 1 names follow
NAMES_LENGTH = struct.Struct("<I")
LABELS_FLAG, NAMES_FLAG = 1, 2
MAX_NAME_BYTES = 255  # a file name's limit on common file systems
MAX_PATH_BYTES = 1024  # a version-5 name (sub-folders and file): far below PATH_MAX (4,096 on Linux)
BATCH_ENTRY = struct.Struct("<II")  # stream length in bytes, CRC32 of the batch's codes
MAX_BATCH_SIZE = 4096  # bounds the work a (CRC-valid but hostile) header can ask for per batch entry
MAX_CODEBOOK_SIZE = 1 << 16
CRC_SIZE = 4


class ContainerError(UserError, ValueError):
    """A .vqz file is unusable (truncated, corrupt, another version, made with other checkpoints)."""


@dataclass
class Container:
    """What a .vqz file holds; ``streams[i]`` codes images ``i * batch_size`` .. ``(i + 1) * batch_size``."""

    prior_sha256: str  # hex
    stage1_sha256: str  # hex
    image_size: int
    channels: int
    grid_shape: tuple[int, int]
    codebook_size: int
    count: int
    batch_size: int
    step_version: int  # the prior's CodePrior.step_version: the arithmetic that made the streams
    streams: list[bytes] = field(default_factory=list)
    codes_crc: list[int] = field(default_factory=list)
    version: int = 3  # what unpack read; what pack writes (2: null class, no labels; 3: labels; 4: with names;
    # 5: with names below sub-folders)
    names: list[str] | None = None  # versions 4, 5: the images' file names (5: paths below --out), one per image
    coded_labels: bool = True  # versions 4, 5 (their flag): whether the streams begin with labels

    @property
    def labels_coded(self) -> bool:
        """Whether each stream begins with its images' labels (when the prior is class-conditional)."""
        return self.coded_labels if self.version >= NAMES_VERSION else self.version >= 3

    @property
    def num_batches(self) -> int:
        return -(-self.count // self.batch_size)

    def batch_bounds(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.count)) for s in range(0, self.count, self.batch_size)]


# ------------------------------------------------------------------------------------------ container
def pack(c: Container) -> bytes:
    """Serialize a container (see the module docstring for the layout)."""
    if c.count < 1:
        raise ValueError(f"a .vqz file holds at least one image, got {c.count}")  # unpack refuses one with none
    if len(c.streams) != c.num_batches or len(c.codes_crc) != c.num_batches:
        raise ValueError(f"{c.num_batches} batches expected, got {len(c.streams)} streams")
    if c.version not in (2, 3, NAMES_VERSION, FORMAT_VERSION):
        raise ValueError(f"pack writes format versions 2 to {FORMAT_VERSION}, got {c.version}")
    if (c.version >= NAMES_VERSION) != (c.names is not None):
        raise ValueError(f"file names go with format versions {NAMES_VERSION} and {FORMAT_VERSION}, and only there")
    head = HEADER.pack(MAGIC, c.version, bytes.fromhex(c.prior_sha256), bytes.fromhex(c.stage1_sha256),
                       c.image_size, c.channels, *c.grid_shape, c.codebook_size, c.count, c.batch_size)  # fmt: skip
    head += STEP.pack(c.step_version)
    if c.version >= NAMES_VERSION:
        block = pack_names(c.names, c.count, folders=c.version == FORMAT_VERSION)
        head += FLAGS.pack(LABELS_FLAG * c.coded_labels | NAMES_FLAG) + NAMES_LENGTH.pack(len(block)) + block
    table = b"".join(BATCH_ENTRY.pack(len(s), crc) for s, crc in zip(c.streams, c.codes_crc))
    body = head + table + b"".join(c.streams)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, name: str = "<bytes>", max_count: int | None = None) -> Container:
    """Parse and check a .vqz file's bytes; ContainerError (naming `name`) on any problem, or if it holds more
    than `max_count` images (checked before its names are inflated)."""
    size = len(data)
    if size < len(MAGIC) and MAGIC.startswith(bytes(data)):
        raise ContainerError(f"{name}: truncated ({size} bytes); re-create it with `compress`")
    if data[: len(MAGIC)] != MAGIC:
        raise ContainerError(f"{name}: not a .vqz file (no VQZ1 magic); pass a file written by `compress`")
    if size < HEADER.size + CRC_SIZE:
        raise ContainerError(f"{name}: truncated ({size} bytes, shorter than the {HEADER.size}-byte header)")
    (_, version, prior_sha, stage1_sha, image_size, channels, gh, gw, k, count, batch_size) = HEADER.unpack_from(data)
    if version not in (1, 2, 3, NAMES_VERSION, FORMAT_VERSION):
        raise ContainerError(f"{name}: unsupported .vqz format version {version}; this code reads versions 1 to "
                             f"{FORMAT_VERSION} (decompress it with the vqgen version that wrote it)")  # fmt: skip
    if zlib.crc32(data[:-CRC_SIZE]) != struct.unpack_from("<I", data, size - CRC_SIZE)[0]:
        raise ContainerError(f"{name}: file is corrupt or truncated (CRC32 mismatch); re-create it with `compress`")
    problems = [f"{what}={v}" for what, v, ok in [
        ("image_size", image_size, image_size >= 1), ("channels", channels, channels in (1, 3)),
        ("grid_height", gh, gh >= 1), ("grid_width", gw, gw >= 1),
        ("codebook_size", k, 1 <= k <= MAX_CODEBOOK_SIZE),
        ("batch_size", batch_size, 1 <= batch_size <= MAX_BATCH_SIZE),
    ] if not ok]  # fmt: skip
    if problems:
        raise ContainerError(f"{name}: corrupt header ({', '.join(problems)})")
    if count == 0:  # decompress made an empty --out of it and exited 0
        raise ContainerError(f"{name} holds no images (its image count is 0), and `compress` never writes such a "
                             "file; re-create it with `compress`")  # fmt: skip
    if max_count is not None and count > max_count:
        raise ContainerError(f"{name} holds {count} images; at most {max_count} are read here: use the "
                             "`decompress` command")  # fmt: skip
    pos, end, step_version = HEADER.size, size - CRC_SIZE, 1  # version 1 files: step version 1
    if version >= 2:
        if end - pos < STEP.size:
            raise ContainerError(f"{name}: truncated (no step version after the header)")
        (step_version,) = STEP.unpack_from(data, pos)
        pos += STEP.size
    c = Container(prior_sha.hex(), stage1_sha.hex(), image_size, channels, (gh, gw), k, count, batch_size,
                  step_version, version=version)  # fmt: skip

    def table_fits(left: int) -> None:  # before anything is built from the count (a forged one inflates nothing)
        if c.num_batches * BATCH_ENTRY.size > left:
            raise ContainerError(f"{name}: truncated or corrupt: the header announces {count} images in "
                                 f"{c.num_batches} batches, more than the file can hold")  # fmt: skip

    if version >= NAMES_VERSION:
        if end - pos < FLAGS.size:
            raise ContainerError(f"{name}: truncated (no flags after the step version)")
        (flags,) = FLAGS.unpack_from(data, pos)
        pos += FLAGS.size
        if flags & ~(LABELS_FLAG | NAMES_FLAG):
            raise ContainerError(f"{name}: corrupt header (unknown flags {flags:#x})")
        c.coded_labels = bool(flags & LABELS_FLAG)
        if flags & NAMES_FLAG:
            if end - pos < NAMES_LENGTH.size:
                raise ContainerError(f"{name}: truncated (no length of the file names)")
            (length,) = NAMES_LENGTH.unpack_from(data, pos)
            pos += NAMES_LENGTH.size
            if length > end - pos:
                raise ContainerError(f"{name}: truncated or corrupt: the file names claim {length} bytes, "
                                     f"{end - pos} are left")  # fmt: skip
            table_fits(end - pos - length)
            c.names = unpack_names(bytes(data[pos : pos + length]), count, name, folders=version == FORMAT_VERSION)
            pos += length
    table_fits(end - pos)
    entries = [BATCH_ENTRY.unpack_from(data, pos + i * BATCH_ENTRY.size) for i in range(c.num_batches)]
    pos += c.num_batches * BATCH_ENTRY.size
    for i, (length, crc) in enumerate(entries):
        if length % 4 or length > end - pos:
            raise ContainerError(f"{name}: truncated or corrupt: batch {i} claims {length} bytes, "
                                 f"{end - pos} are left")  # fmt: skip
        c.streams.append(bytes(data[pos : pos + length]))
        c.codes_crc.append(crc)
        pos += length
    if pos != end:
        raise ContainerError(f"{name}: corrupt: {end - pos} unexpected bytes after the last batch")
    return c


def check_name(n: str, folders: bool = False) -> str | None:
    """What is wrong with `n` as a file name to store and write back (None: nothing): it must be one plain
    name (not . or .., without "/", "\\" or NUL, at most 255 bytes as UTF-8); with `folders` (version 5), a
    relative path of such names joined by "/" (`cats/1f595.png`, at most 1,024 bytes): so no absolute path,
    no "..", no empty part, nothing that could write outside the folder it is written into."""
    try:
        raw = n.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "not encodable as UTF-8"
    if folders and "/" in n:
        if len(raw) > MAX_PATH_BYTES:
            return f"longer than {MAX_PATH_BYTES} bytes"
        problems = [p for part in n.split("/") if (p := check_name(part))]
        return f"not a relative path of plain names ({problems[0]})" if problems else None
    if not n or n in (".", "..") or any(ch in n for ch in "/\\\0"):
        return "not a plain file name"
    if len(raw) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


def pack_names(names: list[str], count: int, folders: bool = False) -> bytes:
    """The names block: zlib of the names' UTF-8 bytes separated by NUL (ValueError if a name is unfit;
    `folders`: names may be relative paths, version 5)."""
    if len(names) != count:
        raise ValueError(f"{count} images but {len(names)} names")
    for n in names:
        if problem := check_name(n, folders):
            raise ValueError(f"file name {n!r}: {problem}")
    return zlib.compress(b"\0".join(n.encode("utf-8", "surrogateescape") for n in names), 9)


def unpack_names(block: bytes, count: int, name: str, folders: bool = False) -> list[str]:
    """The names block -> `count` names, inflated to at most 256 bytes a name (`folders`, version 5: 1,025);
    ContainerError otherwise."""
    limit = count * ((MAX_PATH_BYTES if folders else MAX_NAME_BYTES) + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(block, limit + 1)
    except zlib.error as e:
        raise ContainerError(f"{name}: corrupt file names ({e})") from None
    if len(raw) > limit or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise ContainerError(f"{name}: corrupt file names (not one zlib block of at most {limit} bytes)")
    names = [n.decode("utf-8", "surrogateescape") for n in raw.split(b"\0")] if count else []
    if len(names) != count:
        raise ContainerError(f"{name}: corrupt file names ({len(names)} for {count} images)")
    for n in names:
        if problem := check_name(n, folders):
            raise ContainerError(f"{name}: corrupt file name {n!r} ({problem})")
    return names
