"""Every PIL mode to 8-bit RGB(A) in one place (bindweave_core/images.py), used by the references (and so by
the trainer, which reads images through ``references.load_image``), and the long-prompt warning.

Expected pixels are computed here with numpy from the stored values (16-bit v -> round(v / 257)), not by
the code under test. The 16-bit RGB PNG is written byte by byte (PNG spec: IHDR bit depth 16, colour type 2,
big-endian samples, filter byte 0 per row), so Pillow's own 16-bit decoder is exercised too.
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bindweave_core.images import load_rgb, open_image, to_8bit
from bindweave_core.references import load_image, prepare_references


def _gradient16(w: int = 120, h: int = 80) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 547 + y * 211) % 65536).astype(np.uint16)


def _png_rgb16(path, rgb16: np.ndarray) -> None:
    h, w, _ = rgb16.shape
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + rgb16[r].astype(">u2").tobytes() for r in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_grey_png_reference_matches_its_8bit_conversion(tmp_path):
    """Issue #19: a 16-bit PNG reference became 99.6% white (PIL's convert clips at 255)."""
    values = _gradient16()
    Image.fromarray(values).save(tmp_path / "ref16.png")  # uint16 -> I;16 PNG
    assert Image.open(tmp_path / "ref16.png").mode.startswith("I")
    eight = np.floor(values / 257 + 0.5).astype(np.uint8)
    Image.fromarray(eight).convert("RGB").save(tmp_path / "ref8.png")
    c16, m16 = prepare_references([str(tmp_path / "ref16.png")], 96, 64)  # scaled down: LANCZOS on both
    c8, m8 = prepare_references([str(tmp_path / "ref8.png")], 96, 64)
    assert (c16 - c8).abs().max() <= 1 / 255 + 1e-7
    assert (m16 == m8).all()
    assert c16.mean() < 0.7  # not the clipped, almost white canvas


def test_16bit_rgb_png_reference_matches_its_8bit_conversion(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(40, 60, 3), dtype=np.uint16)
    _png_rgb16(tmp_path / "rgb16.png", rgb16)
    eight = np.floor(rgb16 / 257 + 0.5).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "rgb8.png")
    c16, _ = prepare_references([str(tmp_path / "rgb16.png")], 96, 64)
    c8, _ = prepare_references([str(tmp_path / "rgb8.png")], 96, 64)
    assert (c16 - c8).abs().max() <= 1 / 255 + 1e-7


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", np.array([[0, 257, 65535]], np.uint16), [0, 1, 255]),
    ("I", np.array([[0, 32896, 65535]], np.int32), [0, 128, 255]),  # 16-bit range: / 257
    ("I", np.array([[0, 100, 255]], np.int32), [0, 100, 255]),  # 8-bit range: as is
    ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # 0..1: * 255
    ("F", np.array([[-3.0, 20.0, 200.0]], np.float32), [0, 20, 200]),
])
def test_integer_and_float_modes(mode, values, expected):
    image = Image.fromarray(values.astype(np.uint16)) if mode == "I;16" else Image.fromarray(values)
    assert image.mode == mode
    out = to_8bit(image)
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == expected
    assert (np.asarray(out) == np.asarray(out)[..., :1]).all()  # grey: R = G = B


def test_alpha_modes_keep_their_alpha_and_rgb_drops_it():
    la = Image.fromarray(np.dstack([np.full((2, 2), 90, np.uint8), np.array([[0, 255], [128, 255]], np.uint8)]))
    assert la.mode == "LA"
    rgba = to_8bit(la)
    assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].tolist() == [[0, 255], [128, 255]]
    assert np.asarray(rgba)[..., :3].max() == 90 == np.asarray(rgba)[..., :3].min()
    assert load_rgb(la).mode == "RGB" and np.asarray(load_rgb(la)).max() == 90  # RGB under the alpha kept

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    out = to_8bit(pal)
    assert out.mode == "RGBA" and np.asarray(out).tolist() == [[[255, 0, 0, 255], [0, 0, 255, 0]]]


def test_cmyk_and_other_modes_become_rgb():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # full magenta + yellow, no black: red
    assert np.asarray(to_8bit(cmyk)).reshape(-1, 3).tolist() == [[255, 0, 0]] * 4
    for mode in ("1", "L", "P", "YCbCr", "HSV", "LAB", "RGBX", "I;16B"):
        assert to_8bit(Image.new(mode, (3, 2))).mode == "RGB", mode


def test_animated_gif_gives_its_first_frame_with_a_note(tmp_path, caplog):
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        image = load_image(tmp_path / "anim.gif")  # used to fail: the frame was read after the file closed
    assert "has 3 frames; using the first one" in caplog.text
    r, g, b = np.asarray(image.convert("RGB"))[5, 5]
    assert r > 200 and g < 50 and b < 50
    canvases, _ = prepare_references([str(tmp_path / "anim.gif")], 32, 32)
    assert canvases.shape == (1, 32, 32, 3)


def test_16bit_mask_file_thresholds_like_its_8bit_conversion(tmp_path):
    mask16 = np.zeros((40, 60), np.uint16)
    mask16[10:30, 20:50] = 65535
    mask16[0:5, 0:5] = 30000  # below half: background
    Image.fromarray(mask16).save(tmp_path / "mask16.png")
    Image.new("RGB", (60, 40), (10, 200, 30)).save(tmp_path / "ref.png")
    _, masks = prepare_references([str(tmp_path / "ref.png")], 64, 48, masks=[str(tmp_path / "mask16.png")])
    # 60x40 on 64x48 is not scaled (s = 1): pasted at (2, 4)
    expected = np.zeros((48, 64), bool)
    expected[14:34, 22:52] = True
    assert (masks[0].numpy() == expected).all()


def test_open_image_names_what_failed(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(Exception, match=r"mask 2 .*notes.png: not an image file"):
        open_image(tmp_path / "notes.png", "mask 2")


def test_long_prompt_warns_with_the_counts(caplog):
    from bindweave_core.encoders.text import TextEncoder

    encoder = TextEncoder.tiny()
    prompt = "a red fox runs " * 200
    n = len(encoder.tokenizer([prompt.strip()], add_special_tokens=True)["input_ids"][0])
    assert n > 512
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        ids, mask = encoder.tokenize([prompt, "short"])
    assert ids.shape == (2, 512) and int(mask[0].sum()) == 512
    assert f"a prompt of {n} UMT5 tokens" in caplog.text and f"drops {n - 512}" in caplog.text
    assert caplog.text.count("UMT5 tokens") == 1  # the short one is not reported
