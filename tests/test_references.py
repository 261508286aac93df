"""Reference images: reading, the letterbox + mask of spec section 5, user masks and RGBA cut-outs.

Expected values come from the spec's integer arithmetic and from PIL calls made here, never from
the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bindweave_core import constants as C
from bindweave_core.errors import InputError
from bindweave_core.references import (
    letterbox,
    load_image,
    prepare_references,
    tensor_to_pil,
)
from helpers import SAMPLES, need

IMAGES = SAMPLES / "images"
LANCZOS = Image.Resampling.LANCZOS

# (file, canvas) -> (stored size, pasted size, offset), worked out by hand from spec section 5:
# s = min(W/w0, H/h0, 1), w' = int(w0*s), h' = int(h0*s), offset ((W-w')//2, (H-h')//2).
EXPECTED = {
    ("dog.jpg", (1280, 720)): ((4868, 3244), (1080, 720), (100, 0)),
    ("human.jpg", (1280, 720)): ((320, 430), (320, 430), (480, 145)),  # smaller than the canvas: not upscaled
    ("man.png", (1280, 720)): ((668, 834), (576, 720), (352, 0)),
    ("school.jpg", (1280, 720)): ((1200, 800), (1080, 720), (100, 0)),
    ("woman1.jpg", (1280, 720)): ((1024, 1536), (480, 720), (400, 0)),
    ("woman2.jpg", (1280, 720)): ((1024, 1536), (480, 720), (400, 0)),
    ("dog.jpg", (832, 480)): ((4868, 3244), (720, 480), (56, 0)),
    ("human.jpg", (832, 480)): ((320, 430), (320, 430), (256, 25)),
    ("man.png", (832, 480)): ((668, 834), (384, 480), (224, 0)),
    ("school.jpg", (832, 480)): ((1200, 800), (720, 480), (56, 0)),
    ("woman1.jpg", (832, 480)): ((1024, 1536), (320, 480), (256, 0)),
    ("woman2.jpg", (832, 480)): ((1024, 1536), (320, 480), (256, 0)),
}

_decoded: dict[str, Image.Image] = {}


def sample(name: str) -> Image.Image:
    """The shared image as the official code reads it: opened by content, converted to RGB."""
    if name not in _decoded:
        with Image.open(need(IMAGES / name)) as im:
            _decoded[name] = im.convert("RGB")
    return _decoded[name]


@pytest.mark.parametrize("name,size", sorted(EXPECTED), ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_letterbox_matches_spec_arithmetic(name, size):
    W, H = size
    img = sample(name)
    stored, pasted, offset = EXPECTED[(name, size)]
    assert img.size == stored
    w0, h0 = img.size
    s = min(W / w0, H / h0, 1.0)
    new_w, new_h = int(w0 * s), int(h0 * s)
    left, top = (W - new_w) // 2, (H - new_h) // 2
    assert (new_w, new_h) == pasted and (left, top) == offset

    canvas, mask, place = letterbox(img, W, H)
    assert canvas.mode == "RGB" and canvas.size == (W, H)
    assert (place.width, place.height, place.left, place.top) == (new_w, new_h, left, top)
    assert mask.shape == (H, W) and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (left, left + new_w, top, top + new_h)
    assert mask.sum() == new_w * new_h

    pixels = np.asarray(canvas)
    assert not pixels[~mask].any(), "outside the pasted rectangle must be black"
    own_resize = np.asarray(img.resize((new_w, new_h), LANCZOS))
    np.testing.assert_array_equal(pixels[top:top + new_h, left:left + new_w], own_resize)

    canvases, masks = prepare_references([img], W, H)
    assert canvases.shape == (1, H, W, 3) and canvases.dtype == torch.float32
    np.testing.assert_array_equal(canvases[0].numpy(), pixels.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(masks[0].numpy(), mask.astype(np.float32))


def test_load_image_opens_by_content():
    # woman1.jpg is really a PNG: it must open (and match the decoded PNG), whatever its name says
    im = load_image(need(IMAGES / "woman1.jpg"))
    assert im.format == "PNG" and im.size == (1024, 1536)
    canvases, _ = prepare_references([IMAGES / "woman1.jpg"], 832, 480)
    own, _, _ = letterbox(sample("woman1.jpg"), 832, 480)
    np.testing.assert_array_equal((canvases[0].numpy() * 255).round().astype(np.uint8), np.asarray(own))


def test_paths_and_order_are_kept():
    names = ["human.jpg", "dog.jpg", "school.jpg"]  # case faceobj_1
    canvases, masks = prepare_references([str(need(IMAGES / n)) for n in names], 1280, 720)
    assert canvases.shape == (3, 720, 1280, 3) and masks.shape == (3, 720, 1280)
    assert masks.sum(dim=(1, 2)).tolist() == [320 * 430, 1080 * 720, 1080 * 720]
    for i, n in enumerate(names):
        own, _, _ = letterbox(sample(n), 1280, 720)
        np.testing.assert_array_equal((canvases[i].numpy() * 255).round().astype(np.uint8), np.asarray(own))


def test_comfy_float_tensor_matches_pil_path():
    img = sample("man.png")
    as_comfy = torch.from_numpy(np.array(img)).float() / 255.0  # what ComfyUI's LoadImage produces
    from_path = prepare_references([IMAGES / "man.png"], 1280, 720)
    for tensor in (as_comfy, as_comfy[None]):
        from_tensor = prepare_references([tensor], 1280, 720)
        assert torch.equal(from_tensor[0], from_path[0]) and torch.equal(from_tensor[1], from_path[1])
    batch = torch.stack([as_comfy, as_comfy])  # an IMAGE batch of 2 is 2 references
    canvases, _ = prepare_references(batch, 1280, 720)
    assert canvases.shape[0] == 2 and torch.equal(canvases[1], from_path[0][0])


def test_float_to_uint8_rounds_half_up_and_refuses_values_outside_0_1():
    k = torch.arange(256, dtype=torch.float32)
    exact = (k / 255.0).view(16, 16, 1).expand(16, 16, 3)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(exact))[..., 0], np.arange(256).reshape(16, 16))
    # rounding noise less than half an 8-bit step outside 0..1 passes (it rounds to 0 / 255 anyway)
    tricky = torch.tensor([[[-0.4 / 255, 1 + 0.4 / 255, 10.4 / 255], [10.6 / 255, 0.5, 1.0]]])  # [1, 2, 3]
    out = np.asarray(tensor_to_pil(tricky))
    assert out[0, 0].tolist() == [0, 255, 10] and out[0, 1].tolist() == [11, 128, 255]
    for bad, where in ((-0.3, "from -0.3 to 0.5"), (1.7, "from 0.5 to 1.7"), (1 + 0.6 / 255, "from 0.5 to 1.00235")):
        t = torch.full((2, 2, 3), 0.5)
        t[0, 0, 0] = bad
        with pytest.raises(InputError, match=f"holds values {where};.*It is refused, not rescaled or clamped"):
            tensor_to_pil(t)


def _cutout(w: int, h: int) -> Image.Image:
    """RGBA test image: bright green everywhere (also under transparency), alpha a disc + a ramp."""
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    yy, xx = np.mgrid[:h, :w]
    rgba[..., 3] = np.where((xx - w * 0.4) ** 2 + (yy - h * 0.5) ** 2 < (h * 0.35) ** 2, 255, 0)
    rgba[: h // 8, :, 3] = np.linspace(0, 255, w).astype(np.uint8)[None, :]  # a ramp through 127/128
    return Image.fromarray(rgba)


def test_alpha_mode_unscaled_is_exact():
    img = _cutout(200, 100)
    W, H = 256, 128  # s = 1: pasted 200x100 at (28, 14)
    canvases, masks = prepare_references([img], W, H, mask_mode="alpha")
    rgba = np.asarray(img)
    alpha = rgba[..., 3]
    m = masks[0].numpy()
    assert not m[:14].any() and not m[114:].any() and not m[:, :28].any() and not m[:, 228:].any()
    np.testing.assert_array_equal(m[14:114, 28:228], (alpha > 127).astype(np.float32))
    pixels = (canvases[0].numpy() * 255).round().astype(np.int64)[14:114, 28:228]
    opaque, clear = alpha == 255, alpha == 0
    np.testing.assert_array_equal(pixels[opaque], rgba[..., :3][opaque])
    assert not pixels[clear].any(), "RGB under transparent pixels is composited on black"

    # the default (official) path ignores alpha: rectangle mask, RGB under the alpha kept
    canvases, masks = prepare_references([img], W, H)
    assert masks[0].sum() == 200 * 100
    np.testing.assert_array_equal((canvases[0].numpy() * 255).round()[14:114, 28:228], rgba[..., :3])


def test_alpha_mode_scaled_follows_letterboxed_alpha():
    img = _cutout(400, 200)
    W, H = 160, 128  # s = min(0.4, 0.64) = 0.4 -> 160x80 at (0, 24)
    _, masks = prepare_references([img], W, H, mask_mode="alpha")
    alpha = img.getchannel("A").resize((160, 80), LANCZOS)
    expected = np.zeros((H, W), np.float32)
    expected[24:104, 0:160] = np.asarray(alpha) > 127
    np.testing.assert_array_equal(masks[0].numpy(), expected)
    assert 0 < expected.sum() < 160 * 80


def test_user_mask_follows_letterbox_and_rectangle():
    img = sample("man.png")  # 668x834 -> 576x720 at (352, 0) on 1280x720
    user = np.zeros((834, 668), bool)
    user[100:700, 150:520] = True
    user[300:320, :] = True  # a band touching both image edges
    default_canvas, default_mask = prepare_references([img], 1280, 720)
    expected = np.zeros((720, 1280), np.float32)
    resized = Image.fromarray(user.astype(np.uint8) * 255).resize((576, 720), LANCZOS)
    expected[0:720, 352:928] = np.asarray(resized) > 127
    for given in (user, torch.from_numpy(user).float(), Image.fromarray(user.astype(np.uint8) * 255)):
        canvases, masks = prepare_references([img], 1280, 720, masks=[given])
        np.testing.assert_array_equal(masks[0].numpy(), expected)
        assert torch.equal(canvases, default_canvas), "a user mask changes the mask only"
    assert masks[0, :, :352].sum() == 0 and masks[0, :, 928:].sum() == 0
    assert 0 < masks.sum() < default_mask.sum()


def test_user_mask_of_wrong_size_is_refused():
    img = _cutout(200, 100)
    with pytest.raises(InputError, match="mask 1 is 100x200 but its reference image is 200x100"):
        prepare_references([img], 256, 128, masks=[np.ones((200, 100), bool)])
    with pytest.raises(InputError, match="2 masks given for 1 reference"):
        prepare_references([img], 256, 128, masks=[None, None])


def test_too_many_references_is_an_error_not_a_truncation():
    img = _cutout(64, 64)
    with pytest.raises(InputError, match=f"5 reference images given; BindWeave takes 1 to {C.MAX_REFERENCES}"):
        prepare_references([img] * 5, 256, 128)
    with pytest.raises(InputError, match="0 reference images given"):
        prepare_references([], 256, 128)
    canvases, _ = prepare_references([img] * 4, 256, 128)
    assert canvases.shape[0] == 4


def test_unreadable_files_name_the_path(tmp_path):
    missing = tmp_path / "absent.png"
    with pytest.raises(InputError, match=f"reference image not found: {missing}"):
        prepare_references([missing], 256, 128)
    garbage = tmp_path / "notes.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match="notes.png: not an image file"):
        load_image(garbage)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(need(IMAGES / "man.png").read_bytes()[:2000])
    with pytest.raises(InputError, match="cut.png: the image cannot be decoded"):
        load_image(truncated)
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def test_sizes_must_be_multiples_of_16():
    img = _cutout(64, 64)
    with pytest.raises(InputError, match=r"width must be a positive multiple of 16, got 1000 \(use 992 or 1008\)"):
        prepare_references([img], 1000, 720)
    with pytest.raises(InputError, match="height must be a positive multiple of 16, got 721"):
        prepare_references([img], 1280, 721)
    with pytest.raises(InputError, match="mask_mode must be one of"):
        prepare_references([img], 256, 128, mask_mode="subject")


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(InputError, match="too thin"):
        prepare_references([Image.new("RGB", (16, 20000))], 1280, 720)  # would be 0 pixels wide
