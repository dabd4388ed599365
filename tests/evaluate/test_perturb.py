import io
from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from tidy_detect.data.perturb import DEFAULT_LEVELS, Perturbation, parse_levels
from tidy_detect.errors import ConfigError, UnknownNameError
from tidy_detect.images import load_image

# ---------------------------------------------------------------------------------------------
# Reference copies of the peers' functions, kept verbatim apart from the scipy import path (both
# peers import `from scipy.ndimage.filters import gaussian_filter`, a deprecated alias of the same
# function) and the cv2 import, done lazily so the tests run without OpenCV.


# Yuheng-Li/UniversalFakeDetect, validate.py, png2jpg (commit 1abc486)
def unifd_png2jpg(img, quality):
    out = BytesIO()
    img.save(out, format='jpeg', quality=quality) # ranging from 0-95, 75 is default
    img = Image.open(out)
    # load from memory before ByteIO closes
    img = np.array(img)
    out.close()
    return Image.fromarray(img)


# Yuheng-Li/UniversalFakeDetect, validate.py, gaussian_blur (commit 1abc486)
def unifd_gaussian_blur(img, sigma):
    img = np.array(img)

    gaussian_filter(img[:,:,0], output=img[:,:,0], sigma=sigma)
    gaussian_filter(img[:,:,1], output=img[:,:,1], sigma=sigma)
    gaussian_filter(img[:,:,2], output=img[:,:,2], sigma=sigma)

    return Image.fromarray(img)


# PeterWang512/CNNDetection, data/datasets.py, gaussian_blur (commit ea0b562); called by
# data_augment on `img = np.array(img)`, which then returns `Image.fromarray(img)`.
def cnndetection_gaussian_blur(img, sigma):
    gaussian_filter(img[:,:,0], output=img[:,:,0], sigma=sigma)
    gaussian_filter(img[:,:,1], output=img[:,:,1], sigma=sigma)
    gaussian_filter(img[:,:,2], output=img[:,:,2], sigma=sigma)


# PeterWang512/CNNDetection, data/datasets.py, cv2_jpg (commit ea0b562)
def cnndetection_cv2_jpg(img, compress_val):
    import cv2

    img_cv2 = img[:,:,::-1]
    encode_param = [int(cv2.IMWRITE_JPEG_QUALITY), compress_val]
    result, encimg = cv2.imencode('.jpg', img_cv2, encode_param)
    decimg = cv2.imdecode(encimg, 1)
    return decimg[:,:,::-1]


# PeterWang512/CNNDetection, data/datasets.py, pil_jpg (commit ea0b562)
def cnndetection_pil_jpg(img, compress_val):
    out = BytesIO()
    img = Image.fromarray(img)
    img.save(out, format='jpeg', quality=compress_val)
    img = Image.open(out)
    # load from memory before ByteIO closes
    img = np.array(img)
    out.close()
    return img


# PeterWang512/CNNDetection, data/datasets.py, data_augment (commit ea0b562), with the random
# draws replaced by the chosen sigma / quality / method (blur_prob = jpg_prob = 1).
def cnndetection_data_augment(img, sig=None, qual=None, method="pil"):
    img = np.array(img)
    if sig is not None:
        cnndetection_gaussian_blur(img, sig)
    if qual is not None:
        img = {"cv2": cnndetection_cv2_jpg, "pil": cnndetection_pil_jpg}[method](img, qual)
    return Image.fromarray(img)


# ---------------------------------------------------------------------------------------------


def _photo_like(height, width, seed):
    """Smooth shading, hard edges, fine texture and a little sensor noise, like a real photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([120 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    base[(xx - width / 3) ** 2 + (yy - height / 2) ** 2 < (min(height, width) / 4) ** 2] = (230, 40, 25)
    base[: height // 5, width // 2:] = (10, 15, 90)
    texture = np.asarray(Image.effect_mandelbrot((width, height), (-2.0, -1.2, 0.8, 1.2), 60), dtype=np.float64)
    base += 0.25 * (texture[..., None] - 128) + rng.normal(0, 3, base.shape)
    return Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8))


def _random(height, width, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = {
    "random-37x53": lambda: _random(37, 53, 0),
    "random-1x9": lambda: _random(1, 9, 1),
    "random-128x97": lambda: _random(128, 97, 2),
    "photo-61x83": lambda: _photo_like(61, 83, 3),
    "photo-257x199": lambda: _photo_like(257, 199, 4),
    "flat-grey-15x16": lambda: Image.new("RGB", (16, 15), (128, 128, 128)),
}


@pytest.fixture(params=sorted(IMAGES))
def any_image(request):
    return IMAGES[request.param]()


@pytest.fixture
def image():
    return _random(40, 50, 0)


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


def test_noise_is_the_documented_formula(image):
    import hashlib

    p = Perturbation("noise", 0.005)
    seed = int.from_bytes(hashlib.sha256(b"k|noise-0.005").digest()[:8], "little")
    x = np.asarray(image, dtype=np.float32) / 255.0
    n = np.random.default_rng(seed).normal(0.0, 0.005, x.shape).astype(np.float32)
    expected = np.clip(np.rint((x + n) * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(p.apply(image, "k")), expected)


@pytest.mark.parametrize("sigma", DEFAULT_LEVELS["blur"])
def test_blur_equals_the_peers_gaussian_blur(any_image, sigma):
    ours = np.asarray(Perturbation("blur", sigma).apply(any_image, "k"))
    # UniFD's --gaussian_sigma is an int; CNNDetection's blur_sig a float
    assert np.array_equal(ours, np.asarray(unifd_gaussian_blur(any_image, int(sigma))))
    assert np.array_equal(ours, np.asarray(cnndetection_data_augment(any_image, sig=float(sigma))))
    assert ours.dtype == np.uint8 and ours.shape == np.asarray(any_image).shape


def test_blur_rounds_like_scipy_on_uint8_not_like_a_float_filter():
    image = IMAGES["photo-61x83"]()
    ours = np.asarray(Perturbation("blur", 2).apply(image, "k"), dtype=np.int16)
    floated = np.stack([gaussian_filter(np.asarray(image, dtype=np.float64)[..., c], sigma=2) for c in range(3)], -1)
    diff = ours - np.rint(floated)
    assert (diff != 0).mean() > 0.3 and diff.min() >= -2 and diff.max() <= 0  # truncation in each pass


@pytest.mark.parametrize("quality", DEFAULT_LEVELS["jpeg"] + (100, 95, 30))
def test_jpeg_equals_the_peers_pillow_jpeg(any_image, quality):
    ours = np.asarray(Perturbation("jpeg", quality).apply(any_image, "k"))
    assert np.array_equal(ours, np.asarray(unifd_png2jpg(any_image, quality)))
    assert np.array_equal(ours, cnndetection_pil_jpg(np.array(any_image), quality))
    assert ours.dtype == np.uint8 and ours.shape == np.asarray(any_image).shape


@pytest.mark.parametrize("quality", DEFAULT_LEVELS["jpeg"] + (100, 95, 30))
def test_jpeg_equals_cnndetections_cv2_jpeg(any_image, quality):
    # OpenCV is not a dependency; when present, its encoder (libjpeg-turbo, same defaults) agrees.
    pytest.importorskip("cv2")
    ours = np.asarray(Perturbation("jpeg", quality).apply(any_image, "k"))
    assert np.array_equal(ours, cnndetection_cv2_jpg(np.array(any_image), quality))


def test_jpeg_ignores_the_source_metadata():
    image = IMAGES["photo-61x83"]()
    tagged = image.copy()
    tagged.info.update(comment=b"made by a camera", dpi=(300, 300))
    assert np.array_equal(np.asarray(Perturbation("jpeg", 50).apply(tagged, "k")),
                          cnndetection_pil_jpg(np.array(image), 50))


def test_a_file_perturbed_as_unifd_validates_it(tmp_path):
    # UniFD's RealFakeDataset.__getitem__: Image.open(path).convert("RGB"), blur, then JPEG, then crop.
    path = tmp_path / "fake.png"
    IMAGES["photo-257x199"]().save(path)
    loaded = load_image(path)
    for perturbation in parse_levels("blur", None) + parse_levels("jpeg", None):
        reference = Image.open(path).convert("RGB")
        reference = (unifd_gaussian_blur(reference, int(perturbation.level)) if perturbation.kind == "blur"
                     else unifd_png2jpg(reference, int(perturbation.level)))
        assert np.array_equal(np.asarray(perturbation.apply(loaded.image, loaded.sha256)), np.asarray(reference))


def test_the_store_record_names_the_blur_method():
    blur = Perturbation("blur", 2)
    assert blur.to_dict() == {"kind": "blur", "level": 2.0, "method": "uint8-per-pass"}
    assert Perturbation.from_dict(blur.to_dict()) == blur
    assert Perturbation("jpeg", 25).to_dict() == {"kind": "jpeg", "level": 25.0}  # unchanged pixels, same record
    assert Perturbation.from_dict({"kind": "jpeg", "level": 25.0}) == Perturbation("jpeg", 25)
    with pytest.raises(ConfigError, match="blur method must be 'uint8-per-pass', got None: .* extract them again"):
        Perturbation.from_dict({"kind": "blur", "level": 2.0})  # a store made with the earlier float blur


def test_validation():
    with pytest.raises(UnknownNameError, match="Unknown perturbation 'sepia'. Known: blur, jpeg, noise, resize, webp"):
        Perturbation("sepia", 1)
    with pytest.raises(ConfigError, match="jpeg level must be an integer quality in \\[1, 100\\], got 150"):
        Perturbation("jpeg", 150)
    with pytest.raises(ConfigError, match="noise levels must be numbers"):
        parse_levels("noise", "0.1,abc")


def test_webp_is_a_pillow_roundtrip(image):
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=50)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Perturbation("webp", 50).apply(image, "k")), expected)
