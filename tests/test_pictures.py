"""Pictures: uint8 conversion, grid layout, PNG round trips, difficulty pictures."""

import numpy as np
import pytest

from patch_forcing import pictures as P


def test_to_uint8_matches_reference_convention():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(P.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])  # clip(127.5 x + 128)
    assert P.to_uint8(x).dtype == np.uint8


def test_image_grid_layout():
    imgs = np.arange(5 * 3 * 4 * 1, dtype=np.uint8).reshape(5, 3, 4, 1)
    g = P.image_grid(imgs, ncols=3, pad=1, pad_value=200)
    assert g.shape == (2 * 3 + 3, 3 * 4 + 4, 1)
    np.testing.assert_array_equal(g[1:4, 1:5], imgs[0])
    np.testing.assert_array_equal(g[1:4, 6:10], imgs[1])
    np.testing.assert_array_equal(g[5:8, 6:10], imgs[4])
    assert np.all(g[5:8, 11:15] == 200) and np.all(g[0] == 200) and np.all(g[:, 5] == 200)
    assert P.image_grid(np.zeros((9, 2, 2, 3), np.uint8), pad=0).shape == (6, 6, 3)  # 3 x 3 default
    with pytest.raises(ValueError, match="images"):
        P.image_grid(np.zeros((2, 2, 2), np.uint8))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (6, 4, 3), (3, 3, 4)])
def test_png_round_trip(tmp_path, shape):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    P.save_png(tmp_path / "a.png", a)  # a pathlib.Path (epath-like)
    P.save_png(str(tmp_path / "b.png"), a)  # a str
    want = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
    np.testing.assert_array_equal(P.load_png(tmp_path / "a.png"), want)
    np.testing.assert_array_equal(P.load_png(str(tmp_path / "b.png")), want)
    with pytest.raises(ValueError, match="uint8"):
        P.save_png(tmp_path / "c.png", a.astype(np.float32))


def test_png_round_trip_epath(tmp_path):
    epath = pytest.importorskip("etils.epath")
    a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    P.save_png(epath.Path(tmp_path) / "e.png", a)
    np.testing.assert_array_equal(P.load_png(epath.Path(tmp_path) / "e.png"), a)


def test_colormap_is_monotone_in_lightness():
    rgb = P.colormap(np.linspace(0, 1, 50)).astype(float)
    lum = rgb @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(lum) > 0)  # perceptually ordered: dark = easy, light = hard
    np.testing.assert_array_equal(P.colormap([-1.0, np.nan]), P.colormap([0.0, 0.0]))


def test_difficulty_picture_layout_and_content():
    rng = np.random.default_rng(0)
    r, s, n, p = 3, 10, 16, 2  # 8 x 8 images, 4 x 4 patches
    imgs = rng.integers(0, 256, (r, 8, 8, 1), dtype=np.uint8)
    d = np.exp(rng.normal(size=(r, s, n)))
    masks = rng.random((r, s, n)) < 0.4
    pic = P.difficulty_picture(imgs, d, steps=[0, 4, 9], masks=masks, patch_size=p, tile=32, pad=2)
    assert pic.dtype == np.uint8 and pic.shape == (r * 2 * 34 + 2, 4 * 34 + 2, 3)
    assert pic.std() > 10  # not constant
    # first sample: the image (grey, nearest-upscaled x4) and its heatmap at step 0
    np.testing.assert_array_equal(pic[2:34, 2:34, 0], np.kron(imgs[0, ..., 0], np.ones((4, 4), np.uint8)))
    heat = pic[2:34, 36:68]
    logd = np.log(d[0, [0, 4, 9]])
    norm = (logd - logd.min()) / (logd.max() - logd.min())
    np.testing.assert_array_equal(heat[::8, ::8].reshape(n, 3), P.colormap(norm[0]))
    # its mask row: certain patches light, uncertain ones red
    mrow = pic[36:68, 36:68][::8, ::8].reshape(n, 3)
    np.testing.assert_array_equal(mrow[masks[0, 0]], np.broadcast_to(P.CERTAIN_RGB, (masks[0, 0].sum(), 3)))
    np.testing.assert_array_equal(mrow[~masks[0, 0]], np.broadcast_to(P.UNCERTAIN_RGB, ((~masks[0, 0]).sum(), 3)))


def test_difficulty_picture_decoded_images_and_captions():
    # decoded 32 x 32 RGB images with a 4 x 4 latent patch grid; default steps, captions
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    d = np.exp(rng.normal(size=(2, 20, 16)))
    times = np.broadcast_to(np.linspace(0, 1, 21)[None, :, None], (2, 21, 16))
    pic = P.difficulty_picture(imgs, d, patch_size=2, times=times, labels=["cat", "dog"], tile=32)
    assert pic.shape[1] == 7 * 36 + 4  # image + 6 steps
    plain = P.difficulty_picture(imgs, d, patch_size=2, tile=32)
    assert pic.shape[0] == plain.shape[0] + 12 and not np.array_equal(pic[12:], plain)  # text drawn
    with pytest.raises(ValueError, match="steps"):
        P.difficulty_picture(imgs, d, steps=[20])
    with pytest.raises(ValueError, match="N=15"):
        P.difficulty_picture(imgs, d[..., :15])


def test_image_grid_enlarges_small_images():
    imgs = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    g = P.image_grid(imgs, ncols=2, pad=0, min_size=32)
    assert g.shape == (32, 64, 1)
    assert np.all(g[:4, :4, 0] == imgs[0, 0, 0, 0]) and np.all(g[:4, 4:8, 0] == imgs[0, 0, 1, 0])  # 4x4 blocks
    np.testing.assert_array_equal(g[::4, 32::4], imgs[1])
    assert P.image_grid(imgs, pad=0, min_size=8).shape == (8, 16, 1)
