"""Image metadata: write A1111 infotexts into PNG/JPEG/WebP files and read them back.

Where A1111 keeps the infotext (``modules/images.py``):

* PNG: a text chunk named ``parameters`` (Pillow's ``PngInfo.add_text``: tEXt, or uncompressed iTXt
  when the text is not Latin-1).
* JPEG / WebP: the EXIF UserComment (tag 0x9286 in the Exif IFD) as piexif writes it with
  ``encoding="unicode"``: the 8 bytes ``b"UNICODE\\0"`` followed by UTF-16-BE text.
* GIF: the comment.
* NovelAI PNGs: ``Software: NovelAI``, ``Description`` (prompt) and ``Comment`` (JSON), converted on
  reading into an A1111 infotext the way A1111 does it.
* NovelAI "stealth" metadata (read by the stealth-pnginfo extension and sd-parsers, not by A1111
  itself): bits hidden in the least significant bit of the alpha channel (or of R, G, B), read
  column by column, starting with a 15-byte magic word, then a 32-bit big-endian payload length in
  bits, then the payload (gzip-compressed for the ``...comp`` magic words).

Files are written to a temporary name in the destination directory and then linked into place, so
no half-written image is ever visible and an existing file is never replaced. Decoding refuses
images larger than a pixel budget before any pixel is decompressed, and never trusts sizes
declared inside hidden metadata.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, PngImagePlugin

from voidprompt.errors import InfotextError
from voidprompt.files import atomic_write

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageFileError",
    "ImageTooLargeError",
    "novelai_to_infotext",
    "open_image_safely",
    "read_infotext",
    "read_stealth_metadata",
    "save_image",
    "save_numbered",
    "save_png",
    "unique_path",
    "user_comment_decode",
    "user_comment_encode",
]


class ImageFileError(InfotextError):
    """An image file cannot be read or written (bad data, existing target, unsupported format)."""


class ImageTooLargeError(ImageFileError):
    """An image declares more pixels than the caller's budget; nothing was decompressed."""


# 8192 x 8192: far above any SD1 output, far below what would exhaust memory when decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Hidden metadata larger than this is refused, whatever its header claims.
MAX_STEALTH_BYTES = 16 * 1024 * 1024

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# piexif.helper.UserComment prefixes (8 bytes each).
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_JIS_PREFIX = b"JIS\x00\x00\x00\x00\x00"
# image.info keys A1111 drops before showing the rest (IGNORED_INFO_KEYS).
_IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
    "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})
# A1111 samplers_map: every sampler name and alias, lower case -> A1111 name (1.10).
_SAMPLER_ALIASES: dict[str, str] = {}
for _name, _aliases in (
    ("DPM++ 2M", ("k_dpmpp_2m",)),
    ("DPM++ SDE", ("k_dpmpp_sde",)),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",)),
    ("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",)),
    ("DPM++ 2S a", ("k_dpmpp_2s_a",)),
    ("DPM++ 3M SDE", ("k_dpmpp_3m_sde",)),
    ("Euler a", ("k_euler_a", "k_euler_ancestral")),
    ("Euler", ("k_euler",)),
    ("LMS", ("k_lms",)),
    ("Heun", ("k_heun",)),
    ("DPM2", ("k_dpm_2",)),
    ("DPM2 a", ("k_dpm_2_a",)),
    ("DPM fast", ("k_dpm_fast",)),
    ("DPM adaptive", ("k_dpm_ad",)),
    ("Restart", ("restart",)),
    ("DDIM", ("ddim",)),
    ("DDIM CFG++", ("ddim_cfgpp",)),
    ("PLMS", ("plms",)),
    ("UniPC", ("unipc",)),
    ("LCM", ("k_lcm",)),
):
    _SAMPLER_ALIASES[_name.lower()] = _name
    for _alias in _aliases:
        _SAMPLER_ALIASES[_alias] = _name
del _name, _aliases, _alias

_STEALTH_ALPHA = {b"stealth_pnginfo": False, b"stealth_pngcomp": True}
_STEALTH_RGB = {b"stealth_rgbinfo": False, b"stealth_rgbcomp": True}
_STEALTH_MAGIC_BITS = 15 * 8


# --------------------------------------------------------------------------------------------------
# Opening

Source = bytes | bytearray | str | os.PathLike[str] | IO[bytes]


def open_image_safely(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, refusing it before decoding if it has over ``max_pixels``.

    Pillow reads only the header on open, so the declared size is checked before any pixel data is
    decompressed. Pillow's own global decompression-bomb limit is not consulted (it is process-wide
    state); ``max_pixels`` is the only budget.
    """
    if max_pixels <= 0:
        raise ImageFileError(f"max_pixels={max_pixels}: must be a positive number of pixels")
    name = source if isinstance(source, str | os.PathLike) else "<image data>"
    fp: Any = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"{name}: {error}; refusing to decode it") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageFileError(f"{name}: not a readable image ({error})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}; "
            f"raise max_pixels only for files you trust"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Decoding also reads text chunks that come after the image data.
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        image.close()
        raise ImageFileError(f"{name}: the image data is damaged ({error})") from None
    return image


# --------------------------------------------------------------------------------------------------
# EXIF UserComment

def user_comment_encode(text: str) -> bytes:
    """The UserComment bytes piexif writes for ``encoding="unicode"``: ``UNICODE\\0`` + UTF-16-BE."""
    return _UNICODE_PREFIX + text.encode("utf_16_be")


def user_comment_decode(data: bytes) -> str:
    """Decode a UserComment as A1111 does: by its prefix, else the whole value as lenient UTF-8."""
    prefix, body = data[:8], data[8:]
    encoding = {_UNICODE_PREFIX: "utf_16_be", _ASCII_PREFIX: "ascii", _JIS_PREFIX: "shift_jis"}.get(prefix)
    if encoding is not None:
        try:
            return body.decode(encoding)
        except UnicodeDecodeError:
            pass
    # A1111 quirk: an unknown or undecodable comment is read as UTF-8 including its prefix.
    return data.decode("utf8", errors="ignore")


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        value = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # Pillow raises assorted errors on malformed EXIF; such EXIF has no comment
        return None
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return user_comment_decode(bytes(value))


# --------------------------------------------------------------------------------------------------
# NovelAI

def novelai_to_infotext(items: Mapping[str, Any], width: int, height: int) -> str:
    """The A1111 infotext for NovelAI metadata (``Description`` + ``Comment`` JSON).

    # A1111 quirk: only prompt, uc, steps, sampler, scale and seed are kept; samplers A1111 has no
    # alias for (e.g. ``k_dpmpp_2s_ancestral``, ``k_euler_ancestral`` is known) become "Euler a";
    # "Clip skip: 2, ENSD: 31337" is always appended.
    """
    comment = items["Comment"]
    info = json.loads(comment) if isinstance(comment, str | bytes) else dict(comment)
    sampler = _SAMPLER_ALIASES.get(str(info.get("sampler")), "Euler a")
    return (
        f"{items['Description']}\n"
        f"Negative prompt: {info['uc']}\n"
        f"Steps: {info['steps']}, Sampler: {sampler}, CFG scale: {info['scale']}, Seed: {info['seed']}, "
        f"Size: {width}x{height}, Clip skip: 2, ENSD: 31337"
    )


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8)).tobytes()


_STEALTH_HEADER_BITS = _STEALTH_MAGIC_BITS + 32


def _lsb_bits(image: Image.Image, bits_needed: int, bands: slice) -> np.ndarray:
    """The first ``bits_needed`` LSBs in stealth order, decoding only the columns that hold them."""
    per_column = image.height * (bands.stop - bands.start)
    columns = min(image.width, -(-bits_needed // per_column))
    strip = np.asarray(image.crop((0, 0, columns, image.height)))
    # (H, W, C) -> column-major order: x outer, y inner, then the bands of one pixel.
    return strip.transpose(1, 0, 2)[:, :, bands].reshape(-1)[:bits_needed] & 1


def _decode_stealth(image: Image.Image, bands: slice, compressed: bool, max_bytes: int) -> str:
    header = _lsb_bits(image, _STEALTH_HEADER_BITS, bands)
    if header.size < _STEALTH_HEADER_BITS:
        raise ImageFileError("stealth metadata: header is cut off")
    declared = int.from_bytes(_bits_to_bytes(header[_STEALTH_MAGIC_BITS:]), "big")
    available = image.width * image.height * (bands.stop - bands.start) - _STEALTH_HEADER_BITS
    if declared > available or declared // 8 > max_bytes:
        raise ImageFileError(
            f"stealth metadata: declares {declared} bits but the image holds {available} "
            f"(limit {max_bytes * 8}); refusing it"
        )
    bits = _lsb_bits(image, _STEALTH_HEADER_BITS + declared, bands)
    payload = _bits_to_bytes(bits[_STEALTH_HEADER_BITS:_STEALTH_HEADER_BITS + declared - declared % 8])
    if compressed:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip container
        try:
            payload = inflater.decompress(payload, max_bytes)
        except zlib.error as error:
            raise ImageFileError(f"stealth metadata: bad gzip data ({error})") from None
        if inflater.unconsumed_tail:
            raise ImageFileError(f"stealth metadata: inflates to more than {max_bytes} bytes; refusing it")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ImageFileError(f"stealth metadata: payload is not UTF-8 ({error})") from None


def read_stealth_metadata(image: Image.Image, *, max_bytes: int = MAX_STEALTH_BYTES) -> str | None:
    """The text hidden by NovelAI / stealth-pnginfo in the pixels' least significant bits, or None.

    The alpha channel is tried first (``stealth_pnginfo`` plain, ``stealth_pngcomp`` gzip), then the
    R, G, B channels (``stealth_rgbinfo`` / ``stealth_rgbcomp``, three bits per pixel). Bits run down
    each column, columns left to right, most significant bit first. Only the columns holding the
    header and the declared payload are decoded.
    """
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if image.mode not in ("RGBA", "RGB"):
        if image.mode not in ("LA", "RGBa", "PA", "P", "L"):
            return None
        image = image.convert("RGBA" if has_alpha else "RGB")
    candidates: list[tuple[slice, dict[bytes, bool]]] = []
    if has_alpha:
        candidates.append((slice(3, 4), _STEALTH_ALPHA))
    candidates.append((slice(0, 3), _STEALTH_RGB))
    for bands, magics in candidates:
        magic_bits = _lsb_bits(image, _STEALTH_MAGIC_BITS, bands)
        if magic_bits.size < _STEALTH_MAGIC_BITS:
            continue
        magic = _bits_to_bytes(magic_bits)
        if magic in magics:
            return _decode_stealth(image, bands, magics[magic], max_bytes)
    return None


# --------------------------------------------------------------------------------------------------
# Reading

def read_infotext(
    image: Image.Image | Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stealth: bool = True,
) -> tuple[str | None, dict[str, Any]]:
    """The infotext of an image and its other metadata items, as A1111's ``read_info_from_image``.

    Order (A1111's): the PNG ``parameters`` chunk; replaced by the EXIF UserComment when there is one;
    else a GIF comment; replaced by the NovelAI conversion when ``Software`` is ``NovelAI``. When all
    of that finds nothing and ``stealth`` is on, hidden LSB metadata is read (NovelAI JSON is
    converted like the PNG chunks). Accepts a PIL image or anything :func:`open_image_safely` opens.
    """
    if isinstance(image, Image.Image):
        return _read_infotext(image, stealth)
    opened = open_image_safely(image, max_pixels)
    try:
        return _read_infotext(opened, stealth)
    finally:
        opened.close()


def _read_infotext(image: Image.Image, stealth: bool) -> tuple[str | None, dict[str, Any]]:
    items: dict[str, Any] = {str(key): value for key, value in (image.info or {}).items()}
    geninfo: str | None = items.pop("parameters", None)
    if "exif" in items:
        comment = _exif_user_comment(image)
        if comment:
            geninfo = comment
    elif "comment" in items:
        comment_value = items["comment"]
        geninfo = (
            comment_value.decode("utf8", errors="ignore")
            if isinstance(comment_value, bytes)
            else str(comment_value)
        )
    for key in _IGNORED_INFO_KEYS:
        items.pop(key, None)

    if items.get("Software") == "NovelAI":
        geninfo = _novelai_or_none(items, image.width, image.height, geninfo)
    if geninfo is None and stealth:
        hidden = read_stealth_metadata(image)
        if hidden is not None:
            geninfo = hidden
            decoded = _json_object(hidden)
            if decoded is not None:
                items.update(decoded)
                if decoded.get("Software") == "NovelAI":
                    geninfo = _novelai_or_none(decoded, image.width, image.height, hidden)
    return geninfo, items


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _novelai_or_none(items: Mapping[str, Any], width: int, height: int, fallback: str | None) -> str | None:
    try:
        return novelai_to_infotext(items, width, height)
    except (KeyError, TypeError, ValueError):
        # A1111 reports the error and keeps what it had.
        return fallback


# --------------------------------------------------------------------------------------------------
# Writing

def _write_new_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Fill a temporary file beside ``path`` through ``write`` and link it into place.

    A file that exists is never replaced, even by a racing writer.
    """
    directory = path.parent
    if not directory.is_dir():
        raise ImageFileError(f"{directory}: no such directory; create it first")
    try:
        return atomic_write(path, write, overwrite=False)
    except FileExistsError:
        raise ImageFileError(f"{path}: already exists; voidprompt never overwrites images") from None


def save_png(
    image: Image.Image,
    path: str | os.PathLike[str],
    infotext: str | None,
    *,
    extra_text: Mapping[str, str] | None = None,
) -> Path:
    """Save ``image`` as a new PNG at ``path`` with ``infotext`` in the ``parameters`` chunk.

    Like A1111 (Pillow ``add_text``), text that Latin-1 cannot hold goes into an uncompressed iTXt
    chunk instead of tEXt. Raises ImageFileError if ``path`` exists.
    """
    target = Path(path)
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    for key, value in (extra_text or {}).items():
        info.add_text(key, str(value))
    return _write_new_file(target, lambda temp: image.save(temp, format="PNG", pnginfo=info))


def _exif_bytes(infotext: str) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = user_comment_encode(infotext)
    return exif.tobytes()


def save_image(
    image: Image.Image,
    path: str | os.PathLike[str],
    infotext: str | None,
    *,
    quality: int = 80,
) -> Path:
    """Save a new PNG, JPEG or WebP chosen by the file extension, with the infotext where A1111 puts it.

    JPEG and WebP get RGB pixels and the EXIF UserComment; ``quality`` is A1111's default 80.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".png":
        return save_png(image, target, infotext)
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    if suffix not in formats:
        raise ImageFileError(f"{target}: unsupported extension {suffix!r}; use .png, .jpg, .jpeg or .webp")
    if image.mode != "RGB" and not (formats[suffix] == "JPEG" and image.mode == "L"):
        # A1111 drops alpha for JPEG and WebP.
        image = image.convert("RGB")
    kwargs: dict[str, Any] = {"format": formats[suffix], "quality": quality}
    if infotext is not None:
        kwargs["exif"] = _exif_bytes(infotext)
    return _write_new_file(target, lambda temp: image.save(temp, **kwargs))


_COUNTER = re.compile(r"[0-9]+")


def unique_path(directory: str | os.PathLike[str], stem: str, extension: str = ".png") -> Path:
    """A1111's numbered file name ``NNNNN-<stem><extension>`` that does not exist yet.

    A1111's default sample name is the pattern ``[seed]`` behind a five-digit counter
    (``00000-965400086.png``). The counter starts one above the largest number any file in the
    directory starts with (A1111 ``get_next_sequence_number``), and the first free name within 500
    tries is taken. Use :func:`save_numbered` to also write the file without a race.
    """
    folder = Path(directory)
    if not stem or "/" in stem or os.sep in stem or stem.startswith("."):
        raise ImageFileError(f"stem={stem!r}: must be a plain, non-hidden file name part")
    if not extension.startswith("."):
        extension = "." + extension
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = entry.stem.split("-", 1)[0]
            if _COUNTER.fullmatch(head):
                highest = max(highest, int(head))
    for number in range(highest + 1, highest + 501):
        candidate = folder / f"{number:05}-{stem}{extension}"
        if not candidate.exists():
            return candidate
    raise ImageFileError(f"{folder}: no free file name for {stem!r} after 500 tries")


def save_numbered(
    image: Image.Image,
    directory: str | os.PathLike[str],
    stem: str,
    infotext: str | None,
    *,
    extension: str = ".png",
) -> Path:
    """Save into ``directory`` under the next A1111-style numbered name; retries if a racer took it."""
    for _ in range(500):
        path = unique_path(directory, stem, extension)
        try:
            return save_image(image, path, infotext)
        except ImageFileError:
            if not path.exists():
                raise
    raise ImageFileError(f"{directory}: could not claim a numbered file name for {stem!r}")
