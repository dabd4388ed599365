import io

import numpy as np
import pytest
from PIL import Image

from tidy_detect.data.perturb import DEFAULT_LEVELS, Perturbation, parse_levels
from tidy_detect.errors import ConfigError, UnknownNameError


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


def test_defaults_are_the_papers():
    assert DEFAULT_LEVELS == {"noise": (0.001, 0.005, 0.01), "blur": (1.0, 2.0, 3.0), "jpeg": (75, 50, 25)}
    assert [p.name for p in parse_levels("jpeg", None)] == ["jpeg-75", "jpeg-50", "jpeg-25"]


@pytest.mark.parametrize("kind,level", [("noise", 0.01), ("blur", 2), ("jpeg", 50), ("webp", 50), ("resize", 0.5)])
def test_each_kind_changes_pixels_deterministically(image, kind, level):
    p = Perturbation(kind, level)
    a = np.asarray(p.apply(image, "sha-a"))
    b = np.asarray(p.apply(image, "sha-a"))
    np.testing.assert_array_equal(a, b)
    if kind == "resize":
        assert a.shape == (20, 25, 3)
    else:
        assert a.shape == (40, 50, 3) and not np.array_equal(a, np.asarray(image))


def test_noise_depends_on_the_image_key_and_has_the_right_scale(image):
    p = Perturbation("noise", 0.01)
    a = np.asarray(p.apply(image, "one"), dtype=float)
    b = np.asarray(p.apply(image, "two"), dtype=float)
    assert not np.array_equal(a, b)
    diff = (a - np.asarray(image, dtype=float)) / 255.0
    assert 0.007 < diff.std() < 0.013  # sigma 0.01 on [0, 1], a little clipping and rounding


def test_blur_matches_scipy(image):
    from scipy.ndimage import gaussian_filter

    out = np.asarray(Perturbation("blur", 1).apply(image, "k"))
    ref = gaussian_filter(np.asarray(image, dtype=np.float32)[..., 0], sigma=1)
    np.testing.assert_allclose(out[..., 0], np.clip(np.rint(ref), 0, 255), atol=1)


def test_jpeg_equals_a_pillow_roundtrip(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=25)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Perturbation("jpeg", 25).apply(image, "k")), expected)


def test_validation():
    with pytest.raises(UnknownNameError, match="Unknown perturbation 'sepia'. Known: blur, jpeg, noise, resize, webp"):
        Perturbation("sepia", 1)
    with pytest.raises(ConfigError, match="jpeg level must be an integer quality in \\[1, 100\\], got 150"):
        Perturbation("jpeg", 150)
    with pytest.raises(ConfigError, match="noise levels must be numbers"):
        parse_levels("noise", "0.1,abc")
