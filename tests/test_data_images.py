"""Image files on disk: which count, their order, and reading them as RGB uint8."""
import numpy as np
import pytest
from PIL import Image

from m2r.data.images import UnreadableImage, list_image_files, read_rgb


def test_listing_is_sorted_case_blind_and_recursive_only_when_asked(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "folder.png").mkdir()  # a folder is never an image, whatever its name
    for name in ("b.PNG", "a.jpg", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"")
    assert list_image_files(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    assert list_image_files(tmp_path, recursive=True) == [tmp_path / "a.jpg", tmp_path / "b.PNG",
                                                          tmp_path / "sub/c.webp"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_every_mode_reads_as_rgb_uint8(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 3)).save(path)
    image = read_rgb(path)
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8


def test_an_undecodable_file_names_itself(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImage, match="corrupt.jpg: not an image file PIL can read"):
        read_rgb(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    """PIL's own conversion clips 16-bit grey at 255: a gradient would come out black and white."""
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(1, 256)).save(path)
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image[0, :, 0].tolist() == list(range(256))
    assert (image == image[..., :1]).all()


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".tif"])
def test_exif_orientation_turns_the_pixels_and_the_header_size_alike(tmp_path, suffix):
    """A camera's portrait photo stored landscape with orientation 6 reads as viewers show it (PIL
    reports a TIFF's header size turned already, a JPEG's or WebP's as stored)."""
    from m2r.data.images import read_size

    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :10] = 255   # the stored left third is white: after a 90-degree turn, the top third
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    path = tmp_path / f"portrait{suffix}"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=100)
    image = read_rgb(path)
    assert image.shape == (30, 20, 3) and read_size(path) == (20, 30)
    assert image[:8].mean() > 240 and image[-18:].mean() < 15


def test_float_pixels_and_images_over_pils_pixel_limit_are_refused_naming_the_file(tmp_path, monkeypatch):
    from m2r.data.images import UnreadableImage

    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(path)
    with pytest.raises(UnreadableImage, match="float.tif: 32-bit float pixels"):
        read_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)   # PIL raises past twice this
    Image.new("RGB", (8, 8)).save(tmp_path / "large.png")
    with pytest.raises(UnreadableImage, match="large.png: cannot read image .DecompressionBombError"):
        read_rgb(tmp_path / "large.png")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_rounds_to_the_nearest_8_bit_value(tmp_path, suffix):
    from m2r.data.images import read_rgb

    path = tmp_path / f"g{suffix}"
    Image.fromarray(np.array([[128, 129, 385, 386, 65535 - 128]], np.uint16)).save(path)
    assert read_rgb(path)[0, :, 0].tolist() == [0, 1, 1, 2, 255]


def test_grey_values_beyond_16_bits_are_refused_naming_the_file(tmp_path):
    from m2r.data.images import UnreadableImage, read_rgb

    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
    with pytest.raises(UnreadableImage, match="wide.tif: grey values span 0..70000, beyond 16 bits"):
        read_rgb(path)


@pytest.mark.parametrize("orientation", [5, 7, 8])
def test_every_transposing_exif_orientation_swaps_the_header_size(tmp_path, orientation):
    from m2r.data.images import read_rgb, read_size

    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = orientation
    path = tmp_path / "p.jpg"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path, exif=exif.tobytes())
    assert read_rgb(path).shape == (30, 20, 3) and read_size(path) == (20, 30)
