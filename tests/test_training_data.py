"""Training data: the layouts (sample folders, flat captioned files, JSONL, several datasets with repeats),
frame buckets, head/uniform/chunk windows, image samples and the no-upscale bucket rule."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bindweave_core.video_io import read_video, write_mp4
from training.dataset import choose_bucket, choose_frames, load_clip, load_dataset, window_starts
from training.make_example_dataset import make_example_dataset, reference_images, render_video


def _video(path, frames, width=48, height=32, fps=16):
    bg = (np.zeros(3), np.full(3, 255.0))
    write_mp4(render_video("disc", (220, 40, 40), bg, width, height, frames, 1), path, fps=fps)


def _ref(path):
    reference_images("disc", (220, 40, 40), 16)[0].save(path)


def test_buckets_never_upscale_unless_asked():
    buckets = [[832, 480], [480, 832], [624, 624]]
    assert choose_bucket(1920, 1080, buckets, upscale=False) == (832, 480)
    assert choose_bucket(640, 360, buckets, upscale=False) is None  # every bucket is larger than the clip
    assert choose_bucket(640, 360, buckets, upscale=True) == (832, 480)
    # only the buckets the clip covers compete: 64x48 cannot go to 96x64 even though its ratio is closer
    assert choose_bucket(64, 48, [[96, 64], [48, 48]], upscale=False) == (48, 48)


def test_frame_counts_and_windows():
    # 17 frames at 16 fps: 17 fits, 81 does not; 5 frames: none of these
    assert choose_frames(17, 16.0, [81, 17, 9], 16) == 17
    assert choose_frames(12, 16.0, [81, 17, 9], 16) == 9
    assert choose_frames(5, 16.0, [81, 17, 9], 16) is None
    # 40 source frames, 9-frame windows at the source rate: the window can start at 0..31
    assert window_starts(40, 16.0, 9, 16, "head") == [0]
    assert window_starts(40, 16.0, 9, 16, "uniform", 3) == [0, 16, 31]
    assert window_starts(40, 16.0, 9, 16, "chunk") == [0, 9, 18, 27]
    # sampled at half the source rate a window spans 17 source frames, the next starts 18 later
    assert window_starts(40, 32.0, 9, 16, "chunk") == [0, 18]
    assert window_starts(8, 16.0, 9, 16, "chunk") == []


def test_flat_layout_images_and_sample_folders(tmp_path):
    _video(tmp_path / "walk.mp4", 17)
    (tmp_path / "walk.txt").write_text("a red disc walks\n")
    _ref(tmp_path / "walk_ref1.png")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_text("a green field")
    _ref(tmp_path / "photo_ref1.png")
    _ref(tmp_path / "photo_ref2.png")
    _video(tmp_path / "nocaption.mp4", 17)
    _video(tmp_path / "norefs.mp4", 17)
    (tmp_path / "norefs.txt").write_text("a clip without references")
    make_example_dataset(tmp_path / "folders", samples=1, width=48, height=32, frames=17)
    (tmp_path / "folders" / "sample_000").rename(tmp_path / "sample_000")
    (tmp_path / "folders").rmdir()
    report = load_dataset(tmp_path, [17, 9], 16, [[48, 32], [64, 48]])
    good = {s.name: s for s in report.good}
    assert set(good) == {str(tmp_path / "walk.mp4"), str(tmp_path / "photo.png"), str(tmp_path / "sample_000")}
    photo, walk = good[str(tmp_path / "photo.png")], good[str(tmp_path / "walk.mp4")]
    assert photo.is_image and photo.num_frames == 1 and photo.bucket == (64, 48) and len(photo.references) == 2
    assert walk.num_frames == 17 and walk.prompt == "a red disc walks" and walk.bucket == (48, 32)
    assert [(b.path, b.reason) for b in report.bad] == [
        (str(tmp_path / "nocaption.mp4"), "no caption file nocaption.txt"),
        (str(tmp_path / "norefs.mp4"), "0 reference images; a sample takes 1 to 4 (none found: put them beside it as "
                                       "norefs_ref1.png, norefs_ref2.png, ...)")]
    clip = load_clip(photo, 1, 16, (64, 48))
    assert clip.shape == (1, 3, 1, 48, 64)
    torch_green = clip[0, :, 0, 0, 0]
    assert torch_green.tolist() == pytest.approx([10 / 127.5 - 1, 200 / 127.5 - 1, 30 / 127.5 - 1], abs=1e-6)


def test_chunk_windows_frame_buckets_and_repeats(tmp_path):
    long, short = tmp_path / "long", tmp_path / "short"
    for folder, frames in ((long, 20), (short, 11)):
        folder.mkdir()
        _video(folder / "clip.mp4", frames)
        (folder / "clip.txt").write_text("a red disc")
        _ref(folder / "clip_ref1.png")
    report = load_dataset([(str(long), 1), (str(short), 3)], [9, 5], 16, [[48, 32]], sampling="chunk")
    got = sorted((s.name, s.num_frames, s.start, s.repeats) for s in report.good)
    assert got == [(str(long / "clip.mp4@0"), 9, 0, 1), (str(long / "clip.mp4@9"), 9, 9, 1),
                   (str(short / "clip.mp4@0"), 9, 0, 3)]
    # the window's frames are the source frames from its start (same rate: one to one)
    second = next(s for s in report.good if s.start == 9)
    frames, _ = read_video(second.video)
    clip = load_clip(second, 9, 16, (48, 32))
    want = np.asarray(frames[9:18], dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(clip[0].permute(1, 2, 3, 0).numpy(), want, atol=1e-6)


def test_too_short_and_too_small_clips_are_reported(tmp_path):
    make_example_dataset(tmp_path, samples=1, width=64, height=48, frames=17)
    report = load_dataset(tmp_path, [81], 16, [[64, 48]])
    assert "too few frames: 17 at 16 fps" in report.bad[0].reason and "add a shorter count" in report.bad[0].reason
    report = load_dataset(tmp_path, [17], 16, [[832, 480]])
    assert "64x48 is smaller than every bucket (832x480)" in report.bad[0].reason
    assert load_dataset(tmp_path, [17], 16, [[832, 480]], upscale=True).good[0].bucket == (832, 480)


def test_a_latin1_caption_is_reported_and_left_out_like_a_bad_video(tmp_path):
    """One caption that is not UTF-8 (flat layout or a sample folder's prompt.txt) costs that sample only; a JSONL
    list that is not UTF-8 is an error up front (it holds every sample)."""
    import json

    from bindweave_core.errors import InputError

    for name in ("good", "latin"):
        _video(tmp_path / f"{name}.mp4", 17)
        _ref(tmp_path / f"{name}_ref1.png")
    (tmp_path / "good.txt").write_text("a red disc\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("un caf\u00e9 rouge".encode("latin-1"))
    make_example_dataset(tmp_path / "folders", samples=1, width=48, height=32, frames=17)
    (tmp_path / "folders" / "sample_000" / "prompt.txt").write_bytes("cr\u00e8me".encode("latin-1"))
    (tmp_path / "folders" / "sample_000").rename(tmp_path / "sample_000")
    (tmp_path / "folders").rmdir()
    before = (tmp_path / "latin.txt").read_bytes()
    report = load_dataset(tmp_path, [17], 16, [[48, 32]])
    assert [s.name for s in report.good] == [str(tmp_path / "good.mp4")]
    assert [(b.path, b.reason) for b in report.bad] == [
        (str(tmp_path / "latin.mp4"), "caption file latin.txt is not UTF-8 text (byte 6 is 0xe9); save it as UTF-8"),
        (str(tmp_path / "sample_000"), "caption file prompt.txt is not UTF-8 text (byte 2 is 0xe8); save it as UTF-8")]
    assert (tmp_path / "latin.txt").read_bytes() == before
    jsonl = tmp_path / "list" / "data.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_bytes(json.dumps({"video": "a.mp4", "references": ["r.png"], "prompt": "caf\u00e9"},
                                 ensure_ascii=False).encode("latin-1"))
    with pytest.raises(InputError, match=r"data.jsonl is not UTF-8 text \(byte \d+ is 0xe9\): save it as UTF-8"):
        load_dataset(jsonl, [17], 16, [[48, 32]])
