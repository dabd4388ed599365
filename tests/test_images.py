import io

import numpy as np
import pytest
from PIL import Image

from tidy_detect.errors import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from tidy_detect.images import is_image_path, load_image, sha256_bytes

from tests.conftest import random_image


def _save(img, tmp_path, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_rgb_png_roundtrip_and_hash(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    path = _save(img, tmp_path, "a.png")
    loaded = load_image(path)
    assert (loaded.width, loaded.height, loaded.format) == (30, 20, "PNG")
    assert loaded.sha256 == sha256_bytes(path.read_bytes())
    assert loaded.num_bytes == path.stat().st_size
    assert np.array_equal(np.asarray(loaded.image), np.asarray(img))
    assert load_image(path.read_bytes()).sha256 == loaded.sha256  # bytes give the same identity


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path, "rot.jpg", exif=exif.tobytes())
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (20, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "PA"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16))
        path = _save(img, tmp_path, "x.png")
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
        path = _save(img, tmp_path, "x.tiff")
    elif mode == "CMYK":
        path = _save(base.convert("CMYK"), tmp_path, "x.jpg")
    elif mode == "PA":
        path = _save(base.convert("P"), tmp_path, "x.png", transparency=0)
    else:
        path = _save(base.convert(mode), tmp_path, "x.png")
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (16, 12)
    if mode == "I;16":  # 16-bit white stays white, not clipped garbage
        assert np.asarray(loaded.image).min() == 255


def test_animation_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    pixel = np.asarray(load_image(path).image)[5, 5]
    assert pixel[0] > 200 and pixel[2] < 50


def test_decompression_bomb_refused_from_header(tmp_path):
    path = _save(Image.new("L", (3000, 3000)), tmp_path, "big.png", optimize=True)
    with pytest.raises(ImageTooLargeError, match="9,000,000 pixels is over the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=10_000_000).width == 3000


def test_truncated_file(tmp_path):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CorruptImageError, match="cut.jpg: the file is truncated") as info:
        load_image(path)
    assert info.value.sha256 == sha256_bytes(path.read_bytes())


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(UnsupportedImageError, match="notes.png: not an image"):
        load_image(path)


def test_unsupported_format(tmp_path):
    path = tmp_path / "vector.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(UnsupportedImageError, match="readable include JPEG, PNG"):
        load_image(path)


def test_empty_missing_and_folder(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageNotFoundError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageNotFoundError, match="is a folder"):
        load_image(tmp_path)


def test_all_errors_share_the_base():
    for cls in (CorruptImageError, ImageNotFoundError, ImageTooLargeError, UnsupportedImageError):
        assert issubclass(cls, ImageError)


def test_pil_input_and_suffixes():
    loaded = load_image(Image.new("RGBA", (4, 5)))
    assert loaded.image.mode == "RGB" and loaded.format == "RAW"
    from pathlib import Path

    assert is_image_path(Path("x.tar.gz.JPEG")) and is_image_path(Path("a.b.c.Png"))
    assert not is_image_path(Path("notes.txt"))


# -- bounded reads ------------------------------------------------------------------------------

def test_fifo_and_devices_are_refused_without_reading(tmp_path):
    import os

    from tidy_detect.errors import NotAFileError

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(NotAFileError, match="FIFO"):
        load_image(fifo)
    with pytest.raises(NotAFileError, match="character device"):
        load_image("/dev/zero")  # would never end


def test_file_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    from tidy_detect import images

    path = tmp_path / "big.png"
    random_image(np.random.default_rng(0), 64, 64).save(path)
    size = path.stat().st_size
    reads = []
    original = images._read_up_to
    monkeypatch.setattr(images, "_read_up_to", lambda handle, n: reads.append(n) or original(handle, n))
    with pytest.raises(ImageTooLargeError, match=f"{size:,} bytes is over the limit of 100 bytes"):
        load_image(path, max_bytes=100)
    assert reads == []  # refused from the file's size alone
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(path.read_bytes(), max_bytes=100)
    assert load_image(path, max_bytes=size).num_bytes == size


def test_header_is_checked_before_the_body_is_read(tmp_path, monkeypatch):
    from tidy_detect import images

    path = tmp_path / "bomb.png"
    # A real 3000x3000 PNG (9 M pixels) of noise: far larger than the header probe reads.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > 4 * images.HEADER_BYTES
    read = []
    original = images._read_up_to
    monkeypatch.setattr(images, "_read_up_to", lambda handle, n: read.append(len(chunk := original(handle, n))) or chunk)
    with pytest.raises(ImageTooLargeError, match="9,000,000 pixels"):
        load_image(path, max_pixels=1_000_000)
    assert sum(read) == images.HEADER_BYTES  # the header, and nothing after it


def test_file_errors_record_the_file_stat(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("not an image at all")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.stat is not None and info.value.stat.size == path.stat().st_size
    with pytest.raises(ImageError) as missing:
        load_image(tmp_path / "nope.png")
    assert missing.value.stat is None


def test_reduce_for_models_keeps_the_native_centre_crop():
    from tidy_detect.views import center_crop
    from tidy_detect.images import reduce_for_models

    source = random_image(np.random.default_rng(1), 3000, 1000)
    loaded = load_image(source)
    reduced = reduce_for_models(loaded, 1500, 224)
    assert reduced.image.size == (1500, 500) and reduced.scale == 2.0
    assert (reduced.width, reduced.height) == (3000, 1000)  # what records report
    assert np.array_equal(np.asarray(reduced.center), np.asarray(center_crop(loaded.image, 224)))
    assert reduce_for_models(loaded, 4000, 224) is loaded  # small enough already
    assert reduce_for_models(loaded, 0, 224) is loaded  # off
