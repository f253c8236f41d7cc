"""Safe image decoding for archive scans: any Pillow format, bad EXIF tolerated, size limits.

Everything that opens a scan goes through here, so ingest, embedding, training and reports see the
same pixels: first page/frame only, EXIF orientation applied, converted to 8-bit RGB.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageMode, UnidentifiedImageError

# A truncated file is damage to report, never something to paper over with grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We apply our own configurable limit (max_pixels) before decoding; Pillow's fixed one would
# otherwise fire first with a different message.
Image.MAX_IMAGE_PIXELS = None

# EXIF orientation tag -> the transposition that undoes it.
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


class ImageRejected(Exception):
    """The file cannot be used as an image; `reason` is written for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    mode: str  # Pillow mode of the stored image, e.g. "L", "RGB", "I;16", "CMYK"
    format: str  # Pillow format name, e.g. "JPEG", "TIFF"
    pages: int  # frames/pages in the file, up to PAGE_COUNT_LIMIT; only the first is used


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when absent or when the EXIF block is malformed."""
    try:
        value = im.getexif().get(0x0112, 1)
        value = int(value)
    except Exception:  # malformed EXIF is common in real archive files; it must not fail the image
        return 1
    return value if value in range(1, 9) else 1


def apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    for op in _ORIENTATION.get(orientation, ()):
        im = im.transpose(op)
    return im


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_BAND_PIXELS = 1 << 22  # rows converted at a time from deep greyscale: bounds the float copy


def _grey_to_uint8(arr: np.ndarray, divisor: float) -> np.ndarray:
    """round(arr / divisor * 255), clipped to 0..255, as uint8.

    Done a band of rows at a time: a float64 copy of a whole 150-MP scan would take 1.2 GB.
    """
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for y in range(0, arr.shape[0], rows):
        band = arr[y : y + rows].astype(np.float64) / divisor * 255.0 + 0.5
        out[y : y + rows] = np.clip(band, 0, 255)
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit and float greyscale are rescaled, alpha composited
    on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode in _SIXTEEN_BIT:
            # A 16-bit sample's range is 0..65535 whatever the picture holds: a dark scan must
            # stay dark, not be brightened 257x because its brightest pixel is below 256.
            divisor = 65535.0
        else:  # 32-bit int or float: the range is not in the mode, so guess it from the data
            hi = float(arr.max()) if arr.size else 0.0
            if mode == "F" and hi <= 1.0:
                divisor = 1.0
            elif hi > 255.0:
                divisor = 65535.0 if hi <= 65535.0 else hi
            else:
                divisor = 255.0
        return Image.fromarray(_grey_to_uint8(arr, divisor), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


#: Pages counted in a multi-page file; `ImageInfo.pages` stops there ("at least this many").
PAGE_COUNT_LIMIT = 1000


#: Picture formats Pillow does not decode here, whose files are still scans (camera raw, HEIF,
#: JPEG XL): a name ending so is never advised away as "not an image".
_OTHER_IMAGE_SUFFIXES = frozenset(
    [
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
        ".dng",
        ".cr2",
        ".cr3",
        ".nef",
        ".arw",
        ".orf",
        ".rw2",
        ".raf",
        ".pef",
        ".srw",
        ".x3f",
        ".svg",
    ]
)


def names_an_image(suffix: str) -> bool:
    """Whether a file name's suffix (".JPG") names a picture format, decodable here or not."""
    s = suffix.lower()
    return s in Image.registered_extensions() or s in _OTHER_IMAGE_SUFFIXES


def _count_pages(im: Image.Image) -> int:
    """The file's frames/pages, counted up to PAGE_COUNT_LIMIT; leaves the first one selected.

    Pillow's `n_frames` reads every TIFF page and looks each one up in a list (quadratic): a
    10 MB TIFF of 100,000 empty pages takes 40 s. Only the first page is used, so TIFF pages
    are counted one seek at a time up to the limit; other formats store the count or walk
    their frames in linear time, so their `n_frames` is used.
    """
    if im.format != "TIFF":
        pages = int(getattr(im, "n_frames", 1) or 1)
        if pages > 1:
            im.seek(0)
        # saturated: an animated PNG's header may declare 2^31 frames (the manifest's int32)
        return min(pages, PAGE_COUNT_LIMIT)
    pages = 1
    try:
        while pages < PAGE_COUNT_LIMIT:
            im.seek(pages)
            pages += 1
    except EOFError:
        pass  # no more pages
    except (OSError, SyntaxError, ValueError, struct.error):
        pass  # a damaged later page: the first is the one used, so the count stops there
    im.seek(0)
    return pages


#: Decode cost bounds, checked before decoding. A decoded picture may take at most as many bytes
#: as an 8-bit RGB one at the pixel limit (ingest.max_pixels): an RGBA, CMYK, 16-bit or float
#: picture under the pixel limit could otherwise take GBs (a 786 KB PNG: 14000x14000 RGBA).
BYTES_PER_LIMIT_PIXEL = 3
#: Scans in a JPEG: each progressive scan makes the decoder go over the whole picture again, so
#: one scan repeated thousands of times costs minutes. Encoders write about 10 (libjpeg's
#: progressive script); a baseline JPEG has one per component at most.
MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # start of scan; entropy-coded data stuffs every 0xFF, so it marks only scans


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Bytes of a decoded picture: pixels x bands x bytes per band."""
    return size[0] * size[1] * _bytes_per_pixel(mode)


@functools.cache
def _bytes_per_pixel(mode: str) -> int:
    try:
        m = ImageMode.getmode(mode)
        return len(m.bands) * np.dtype(m.typestr).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def jpeg_scans(source: str | Path | bytes) -> int:
    """Start-of-scan markers in a JPEG file, counted without decoding (an embedded thumbnail's
    scans count too, which only errs on the safe side)."""
    if isinstance(source, bytes):
        return source.count(_SOS)
    n, tail = 0, b""
    with open_regular(source) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            n += (tail + chunk).count(_SOS)
            tail = chunk[-1:]
    return n


def _check_cost(im: Image.Image, source: str | Path | bytes, max_pixels: int | None) -> None:
    """Refuse a picture whose decoding would cost too much memory or time (ImageRejected)."""
    if max_pixels is not None:
        need, limit = decoded_bytes(im.size, im.mode), BYTES_PER_LIMIT_PIXEL * max_pixels
        if need > limit:
            w, h = im.size
            raise ImageRejected(
                f"too costly to decode: {w}x{h} {im.mode} takes {need / 1e6:,.0f} MB decoded, "
                f"over the limit of {limit / 1e6:,.0f} MB ({BYTES_PER_LIMIT_PIXEL} bytes a pixel "
                f"x ingest.max_pixels); possible decompression bomb"
            )
    if im.format in ("JPEG", "MPO"):
        scans = jpeg_scans(source)
        if scans > MAX_JPEG_SCANS:
            raise ImageRejected(
                f"too costly to decode: a JPEG of {scans:,} scans (the limit is "
                f"{MAX_JPEG_SCANS}; encoders write about 10); possible decompression bomb"
            )


def _describe_decode_error(exc: Exception) -> str:
    msg = str(exc).strip() or type(exc).__name__
    low = msg.lower()
    if "truncated" in low or "premature end" in low or "broken data stream" in low:
        return f"damaged image: the file is truncated ({msg})"
    return f"damaged image: the image data cannot be decoded ({msg})"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 32 or b in (9, 10, 13) for b in head)


def open_scan(
    source: str | Path | bytes,
    *,
    max_pixels: int | None = None,
    draft: tuple[str, int] | None = None,
    rgb: bool = True,
    name: str = "",
) -> tuple[Image.Image, ImageInfo]:
    """Decode the first page of a scan, oriented; as 8-bit RGB unless `rgb` is False.

    `source` is a path or the file's bytes. `draft=(mode, size)` lets a JPEG decode at a reduced
    DCT scale (and straight to "L" or "RGB") when only a picture of at least `size` px is needed;
    the whole file is still decoded, so truncation is still detected. With `rgb=False` the picture
    keeps its own mode (cheaper when only a hash is wanted). Raises ImageRejected with a reason.
    """
    # a path: only a regular file is opened (a FIFO or a device would hang the decoder)
    fp = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source)
    with fp, warnings.catch_warnings():
        # Pillow warns about odd metadata in real scans; the image itself is what matters here.
        warnings.simplefilter("ignore")
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            head = source[:512] if isinstance(source, bytes) else b""
            if _looks_like_text(head):
                raise ImageRejected("not an image: the file contains text") from None
            suffix = Path(name).suffix.lower() if name else ""
            hint = f" (the name says {suffix})" if suffix else ""
            raise ImageRejected(f"not an image: no decoder recognises the content{hint}") from None
        except Image.DecompressionBombError as exc:  # only if someone re-enables Pillow's limit
            raise ImageRejected(f"image too large: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageRejected(_describe_decode_error(exc)) from None
        with im:
            try:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageRejected(
                        f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                        f"{max_pixels:,} (ingest.max_pixels); possible decompression bomb"
                    )
                pages = _count_pages(im)
                fmt = im.format or "unknown"
                mode = im.mode
                orientation = exif_orientation(im)
                if draft is not None and fmt == "JPEG":
                    want = draft[0] if mode in ("L", "RGB", "YCbCr") else mode
                    im.draft(want, (draft[1], draft[1]))
                _check_cost(im, source, max_pixels)  # at the size it will decode to
                im.load()
                # No copy: the loaded picture outlives `with im` (which only closes the file),
                # and a copy would double the peak memory of a large scan.
                pic = apply_orientation(to_rgb(im) if rgb else im, orientation)
            except ImageRejected:
                raise
            except MemoryError:
                raise ImageRejected("image too large: not enough memory to decode it") from None
            except (
                OSError,
                SyntaxError,
                ValueError,
                EOFError,
                IndexError,
                TypeError,
                ZeroDivisionError,
                struct.error,
            ) as exc:
                raise ImageRejected(_describe_decode_error(exc)) from None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return pic, ImageInfo(width=w, height=h, mode=mode, format=fmt, pages=pages)


_DCT_CACHE: dict[int, np.ndarray] = {}


def _dct_matrix(n: int) -> np.ndarray:
    if n not in _DCT_CACHE:
        k = np.arange(n)[:, None]
        x = np.arange(n)[None, :]
        m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        m[0] /= np.sqrt(2.0)
        _DCT_CACHE[n] = m
    return _DCT_CACHE[n]


def phash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash (the pHash recipe: 32x32 grey, low 8x8 DCT block vs its
    median).

    Written for ingest's per-file budget (it runs on every new scan): the pixels are read
    with one `tobytes`, the median of the 64 coefficients is the mean of the middle two of a
    sort (what np.median computes, bit for bit) and the bits are packed by numpy; the value is
    the same as that of the plain loop over the bits, most significant first.
    """
    if im.mode not in ("L", "RGB"):
        im = to_rgb(im)
    if im.mode != "L":
        im = im.convert("L")
    small = im.resize((32, 32), Image.Resampling.BOX)
    grey = np.frombuffer(small.tobytes(), np.uint8).reshape(32, 32).astype(np.float64)
    d = _dct_matrix(32)
    coeffs = (d @ grey @ d.T)[:8, :8].ravel()
    middle = np.sort(coeffs)[31:33]
    bits = coeffs > (middle[0] + middle[1]) / 2.0
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def load_rgb(
    path: str | Path | bytes,
    size: int | None = None,
    *,
    max_pixels: int | None = None,
) -> Image.Image:
    """The oriented RGB picture of a scan, decoded cheaply at about `size` px when given."""
    rgb, _ = open_scan(path, max_pixels=max_pixels, draft=("RGB", size) if size else None)
    return rgb


# --------------------------------------------------------------------------- opening files

NOT_REGULAR = "not a regular file (a pipe, socket or device), so it is not read"


class NotRegularFile(OSError):
    """Only regular files are ever opened: reading a FIFO blocks until a writer comes (forever),
    a device like /dev/zero never ends."""


def not_regular(path: str | os.PathLike[str] | bytes) -> str | None:
    """Why `path` (links followed) is not a regular file to read, or None when it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return None if stat.S_ISREG(mode) else NOT_REGULAR


def open_regular(path: str | os.PathLike[str] | bytes) -> BinaryIO:
    """Open a regular file for reading; anything else raises NotRegularFile, never blocking.

    Checked before opening (a device is never opened), and again on the open descriptor:
    O_NONBLOCK makes the open of a FIFO swapped in meanwhile return at once instead of
    waiting for a writer.
    """
    if not_regular(path) == NOT_REGULAR:
        raise NotRegularFile(errno.EINVAL, NOT_REGULAR, os.fsdecode(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise (
                IsADirectoryError(errno.EISDIR, "is a folder, not a file", os.fsdecode(path))
                if stat.S_ISDIR(mode)
                else NotRegularFile(errno.EINVAL, NOT_REGULAR, os.fsdecode(path))
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
