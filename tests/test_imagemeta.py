"""Image metadata: PNG/JPEG/WebP infotexts, NovelAI metadata, stealth LSB data, safe opening, saving.

Fixtures are built here with writers independent of voidprompt's own: EXIF bytes laid out by hand
the way piexif lays them out, and stealth bits set pixel by pixel in plain Python.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from voidprompt.errors import InfotextError
from voidprompt.imagemeta import (
    ImageFileError,
    ImageTooLargeError,
    open_image_safely,
    read_infotext,
    read_stealth_metadata,
    save_image,
    save_numbered,
    save_png,
    unique_path,
    user_comment_decode,
    user_comment_encode,
)
from voidprompt.infotext import parse_generation_parameters

INFOTEXT = (
    "a cat, (sitting:1.2)\nsecond line\nNegative prompt: dog, blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, Size: 64x32, "
    'Model hash: abcdef1234, Model: mymodel, Lora hashes: "a: 1, b: 2", Version: voidprompt-0.1.0'
)


def _image(mode: str = "RGB", size: tuple[int, int] = (64, 32)) -> Image.Image:
    colour = {"RGB": (10, 20, 30), "RGBA": (10, 20, 30, 255), "L": 7}[mode]
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- PNG

def test_png_round_trip_uses_text_chunk(tmp_path: Path) -> None:
    path = save_png(_image(), tmp_path / "a.png", INFOTEXT)
    data = path.read_bytes()
    assert b"tEXtparameters\x00" in data  # Latin-1 text: a plain tEXt chunk, as A1111 writes
    geninfo, items = read_infotext(path)
    assert geninfo == INFOTEXT
    assert items == {}


def test_png_non_latin1_goes_to_itxt(tmp_path: Path) -> None:
    text = "猫, 日本語\nSteps: 1, Seed: 2, Sampler: Euler"
    path = save_png(_image(), tmp_path / "u.png", text)
    assert b"iTXtparameters\x00" in path.read_bytes()
    assert read_infotext(path)[0] == text


def test_png_is_read_by_sd_parsers_identically(tmp_path: Path) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    path = save_png(_image(), tmp_path / "o.png", INFOTEXT)
    info = sd_parsers.ParserManager().parse(str(path))
    sampler = info.samplers[0]
    ours = parse_generation_parameters(INFOTEXT)
    assert sampler.prompts[0].value == ours["Prompt"] == "a cat, (sitting:1.2)\nsecond line"
    assert sampler.negative_prompts[0].value == ours["Negative prompt"] == "dog, blurry"
    assert sampler.name == ours["Sampler"]
    assert sampler.parameters["seed"] == ours["Seed"]
    assert sampler.parameters["steps"] == ours["Steps"]
    assert sampler.parameters["cfg_scale"] == ours["CFG scale"]
    assert sampler.parameters["scheduler"] == ours["Schedule type"]
    assert sampler.model.name == ours["Model"] and sampler.model.hash == ours["Model hash"]
    assert info.metadata["Size"] == f'{ours["Size-1"]}x{ours["Size-2"]}'


# ------------------------------------------------------------------------------------ atomic saving

def test_save_never_overwrites_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = save_png(_image(), tmp_path / "x.png", "first")
    before = path.read_bytes()
    with pytest.raises(ImageFileError, match="already exists"):
        save_png(_image(), path, "second")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    assert isinstance(ImageFileError("x"), InfotextError)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class Broken:
        def save(self, *args: object, **kwargs: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "b.png", "x")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="no such directory"):
        save_png(_image(), tmp_path / "nope" / "a.png", "x")


def test_unique_path_counts_like_a1111(tmp_path: Path) -> None:
    assert unique_path(tmp_path, "965400086") == tmp_path / "00000-965400086.png"
    for name in ("00000-1.png", "00007-2.png", "notes.txt", "12a-3.png", "00003.jpg"):
        (tmp_path / name).write_bytes(b"")
    # one above the largest leading counter (7); "12a" is not a counter.
    assert unique_path(tmp_path, "5", ".jpg") == tmp_path / "00008-5.jpg"
    with pytest.raises(ImageFileError, match="stem"):
        unique_path(tmp_path, "../evil")


def test_save_numbered_takes_consecutive_names(tmp_path: Path) -> None:
    first = save_numbered(_image(), tmp_path, "42", "a\nSteps: 1, Seed: 42, Sampler: Euler")
    second = save_numbered(_image(), tmp_path, "42", "b\nSteps: 1, Seed: 42, Sampler: Euler")
    assert (first.name, second.name) == ("00000-42.png", "00001-42.png")
    assert read_infotext(second)[0].startswith("b\n")  # type: ignore[union-attr]


# -------------------------------------------------------------------------------------- JPEG / WebP

def _piexif_style_exif(user_comment: bytes) -> bytes:
    """EXIF as piexif.dump writes it: big-endian TIFF, IFD0 -> Exif IFD -> UserComment (UNDEFINED)."""
    ifd0_offset, entry = 8, 12
    exif_ifd_offset = ifd0_offset + 2 + entry + 4
    data_offset = exif_ifd_offset + 2 + entry + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_offset)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, exif_ifd_offset) + struct.pack(">I", 0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(user_comment), data_offset)
    tiff += struct.pack(">I", 0) + user_comment
    return b"Exif\x00\x00" + tiff


def test_user_comment_encoding_matches_piexif_unicode() -> None:
    assert user_comment_encode("Aé") == b"UNICODE\x00" + b"\x00A\x00\xe9"
    assert user_comment_decode(b"ASCII\x00\x00\x00plain") == "plain"
    # Unknown prefix: A1111 decodes the whole value as UTF-8, prefix included.
    assert user_comment_decode(b"XXXXXXXXhi") == "XXXXXXXXhi"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_reads_exif_written_the_piexif_way(fmt: str) -> None:
    buffer = io.BytesIO()
    _image().save(buffer, format=fmt, exif=_piexif_style_exif(user_comment_encode(INFOTEXT)))
    geninfo, items = read_infotext(buffer.getvalue())
    assert geninfo == INFOTEXT
    assert "exif" not in items


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_webp_round_trip(tmp_path: Path, suffix: str) -> None:
    text = "猫 and a dog, (x:1.1)\nNegative prompt: bad\nSteps: 20, Sampler: Euler a, Seed: 9, Note: \"a, b\""
    path = save_image(_image("RGBA"), tmp_path / f"r{suffix}", text)
    geninfo, _ = read_infotext(path)
    assert geninfo == text
    with Image.open(path) as reopened:
        assert reopened.mode == "RGB"  # A1111 drops alpha for JPEG/WebP


def test_jpeg_is_read_by_sd_parsers(tmp_path: Path) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    path = save_image(_image(), tmp_path / "o.jpg", INFOTEXT)
    sampler = sd_parsers.ParserManager().parse(str(path)).samplers[0]
    assert sampler.prompts[0].value == "a cat, (sitting:1.2)\nsecond line"
    assert (sampler.name, sampler.parameters["seed"]) == ("DPM++ 2M", "123")


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="unsupported extension"):
        save_image(_image(), tmp_path / "a.bmp", "x")


# ----------------------------------------------------------------------------------------- NovelAI

NAI_COMMENT = {
    "steps": 28, "sampler": "k_euler_ancestral", "seed": 2253955223, "strength": 0.4, "noise": 0.0,
    "scale": 11.0, "uc": "lowres, bad anatomy",
}
NAI_EXPECTED = (
    "masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: Euler a, CFG scale: 11.0, Seed: 2253955223, Size: 64x32, Clip skip: 2, ENSD: 31337"
)


def _novelai_chunks(comment: dict[str, object]) -> dict[str, str]:
    return {
        "Title": "AI generated image",
        "Description": "masterpiece, 1girl",
        "Software": "NovelAI",
        "Source": "Stable Diffusion 1D44365E",
        "Comment": json.dumps(comment),
    }


def _png_with_text(image: Image.Image, chunks: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_novelai_png_converted_like_a1111() -> None:
    geninfo, items = read_infotext(_png_with_text(_image(), _novelai_chunks(NAI_COMMENT)))
    assert geninfo == NAI_EXPECTED
    assert items["Software"] == "NovelAI" and items["Source"] == "Stable Diffusion 1D44365E"
    parsed = parse_generation_parameters(geninfo)
    assert (parsed["Clip skip"], parsed["ENSD"], parsed["Sampler"]) == ("2", "31337", "Euler a")


@pytest.mark.parametrize(
    ("nai_sampler", "a1111"),
    [("k_dpmpp_2m", "DPM++ 2M"), ("k_euler", "Euler"), ("ddim", "DDIM"),
     ("k_dpmpp_2s_ancestral", "Euler a"), ("nai_smea", "Euler a")],  # unknown names fall back
)
def test_novelai_sampler_mapping(nai_sampler: str, a1111: str) -> None:
    comment = {**NAI_COMMENT, "sampler": nai_sampler}
    geninfo, _ = read_infotext(_png_with_text(_image(), _novelai_chunks(comment)))
    assert f"Sampler: {a1111}," in geninfo  # type: ignore[operator]


def test_novelai_bad_comment_keeps_what_was_there() -> None:
    chunks = {**_novelai_chunks(NAI_COMMENT), "Comment": "{not json"}
    geninfo, items = read_infotext(_png_with_text(_image(), chunks))
    assert geninfo is None and items["Comment"] == "{not json"


# ------------------------------------------------------------------------------------ stealth LSB

def _embed_stealth(image: Image.Image, magic: str, payload: bytes, channels: str) -> Image.Image:
    """Independent writer: set LSBs column by column (x outer, y inner), MSB first."""
    out = image.copy()
    bits: list[int] = []
    for byte in magic.encode() + struct.pack(">I", len(payload) * 8) + payload:
        bits.extend((byte >> (7 - i)) & 1 for i in range(8))
    pixels = out.load()
    assert pixels is not None
    width, height = out.size
    band_indexes = [3] if channels == "alpha" else [0, 1, 2]
    assert len(bits) <= width * height * len(band_indexes)
    index = 0
    for x in range(width):
        for y in range(height):
            values = list(pixels[x, y])  # type: ignore[arg-type]
            for band in band_indexes:
                if index < len(bits):
                    values[band] = (values[band] & ~1) | bits[index]
                    index += 1
            pixels[x, y] = tuple(values)
    return out


def _gzip_json(value: object) -> bytes:
    return gzip.compress(json.dumps(value).encode())


def test_stealth_novelai_pngcomp_alpha() -> None:
    nai = _novelai_chunks(NAI_COMMENT)
    image = _embed_stealth(_image("RGBA"), "stealth_pngcomp", _gzip_json(nai), "alpha")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # no text chunks: only the pixels carry the metadata
    geninfo, items = read_infotext(buffer.getvalue())
    assert geninfo == NAI_EXPECTED
    assert items["Software"] == "NovelAI"


@pytest.mark.filterwarnings("ignore:Image.Image.getdata is deprecated:DeprecationWarning")
def test_stealth_is_read_by_sd_parsers_the_same_way(tmp_path: Path) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    nai = _novelai_chunks(NAI_COMMENT)
    image = _embed_stealth(_image("RGBA"), "stealth_pngcomp", _gzip_json(nai), "alpha")
    path = tmp_path / "s.png"
    image.save(path)
    info = sd_parsers.ParserManager(eagerness=sd_parsers.Eagerness.EAGER).parse(str(path))
    assert info.samplers[0].prompts[0].value == "masterpiece, 1girl"
    assert info.samplers[0].negative_prompts[0].value == "lowres, bad anatomy"
    assert read_stealth_metadata(Image.open(path)) == json.dumps(nai)


@pytest.mark.parametrize(
    ("magic", "compress", "channels"),
    [
        ("stealth_pnginfo", False, "alpha"),
        ("stealth_rgbinfo", False, "rgb"),
        ("stealth_rgbcomp", True, "rgb"),
    ],
)
def test_stealth_variants_carry_a1111_infotext(magic: str, compress: bool, channels: str) -> None:
    payload = INFOTEXT.encode()
    if compress:
        payload = gzip.compress(payload)
    mode = "RGBA" if channels == "alpha" else "RGB"
    image = _embed_stealth(_image(mode, (48, 48)), magic, payload, channels)
    assert read_infotext(image)[0] == INFOTEXT
    # A text chunk wins over hidden data, as the reader only looks for it when nothing else is there.
    image.info["parameters"] = "visible\nSteps: 1, Seed: 1, Sampler: Euler"
    assert read_infotext(image)[0] == "visible\nSteps: 1, Seed: 1, Sampler: Euler"


def test_stealth_lying_length_is_refused() -> None:
    image = _embed_stealth(_image("RGBA"), "stealth_pnginfo", b"hi", "alpha")
    pixels = image.load()
    assert pixels is not None
    # Rewrite the 32 length bits (after the 120 magic bits) to claim 2**31 bits.
    height = image.size[1]
    for i, bit in enumerate(format(2**31, "032b")):
        position = 120 + i
        x, y = divmod(position, height)
        r, g, b, a = pixels[x, y]  # type: ignore[misc]
        pixels[x, y] = (r, g, b, (a & ~1) | int(bit))
    with pytest.raises(ImageFileError, match="declares"):
        read_stealth_metadata(image)


def test_stealth_gzip_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\x00" * 200_000)
    image = _embed_stealth(_image("RGBA", (128, 128)), "stealth_pngcomp", bomb, "alpha")
    with pytest.raises(ImageFileError, match="inflates"):
        read_stealth_metadata(image, max_bytes=100_000)


def test_no_stealth_means_none() -> None:
    assert read_stealth_metadata(_image("RGBA")) is None
    assert read_infotext(_image("RGB")) == (None, {})


# ----------------------------------------------------------------------------------- safe opening

def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid 1x1 PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # Far over Pillow's own bomb limit: refused at open, no pixel decoded.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        open_image_safely(_png_claiming_size(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        open_image_safely(_png_claiming_size(9000, 9000))
    with pytest.raises(ImageTooLargeError):
        read_infotext(_png_claiming_size(5000, 5000), max_pixels=1_000_000)


def test_image_within_budget_opens() -> None:
    buffer = io.BytesIO()
    Image.new("L", (300, 200)).save(buffer, format="PNG")
    image = open_image_safely(buffer.getvalue(), max_pixels=300 * 200)
    assert image.size == (300, 200)
    with pytest.raises(ImageTooLargeError):
        open_image_safely(buffer.getvalue(), max_pixels=300 * 200 - 1)


def test_garbage_and_truncated_data_are_clear_errors() -> None:
    with pytest.raises(ImageFileError, match="not a readable image"):
        open_image_safely(b"definitely not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    with pytest.raises(ImageFileError):
        open_image_safely(buffer.getvalue()[:60])


def test_modes_without_room_for_stealth_read_as_nothing() -> None:
    assert read_infotext(_image("L")) == (None, {})
    assert read_stealth_metadata(Image.new("1", (8, 8))) is None
    assert read_stealth_metadata(Image.new("RGBA", (1, 1))) is None  # too small for the magic word
