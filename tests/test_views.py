import numpy as np
from PIL import Image

from tidy_detect.views import center_crop, clamp_box, crop_box, to_normalized_array


def _ramp(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :] % 256
    a[..., 1] = np.arange(h)[:, None] % 256
    return Image.fromarray(a)


def test_center_crop_at_native_resolution():
    crop = np.asarray(center_crop(_ramp(300, 250), 224))
    assert crop.shape == (224, 224, 3)
    # origin round((300-224)/2)=38 horizontally, round((250-224)/2)=13 vertically; no resize
    assert crop[0, 0, 0] == 38 and crop[0, 0, 1] == 13
    assert crop[0, 223, 0] == (38 + 223) % 256


def test_center_crop_pads_small_images_like_torchvision():
    img = Image.new("RGB", (5, 3), (255, 255, 255))
    crop = np.asarray(center_crop(img, 8))
    # pad left (8-5)//2 = 1, right 2; top (8-3)//2 = 2, bottom 3
    assert crop.shape == (8, 8, 3)
    white = crop[..., 0] == 255
    assert white[2:5, 1:6].all() and white.sum() == 15


def test_normalized_array():
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    arr = to_normalized_array([img], mean=[0.5, 0.5, 0.2], std=[0.5, 0.25, 0.1])
    assert arr.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(arr[0, :, 0, 0], [1.0, -2.0, 0.0], atol=1e-6)


def test_clamp_and_crop_box():
    assert clamp_box([-5.2, 3.4, 10.1, 200], 50, 40) == (0, 3, 11, 40)
    assert clamp_box([30, 30, 30, 30], 50, 40) == (30, 30, 31, 31)  # degenerate -> 1x1
    assert clamp_box([60, 50, 70, 80], 50, 40) == (49, 39, 50, 40)
    assert crop_box(_ramp(50, 40), [10, 5, 20.5, 9]).size == (11, 4)
