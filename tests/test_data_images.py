"""Image files on disk: which count, their order, and reading them as RGB uint8."""
import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from m2r.data.images import list_image_files, read_rgb


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
    with pytest.raises(UnidentifiedImageError, match="corrupt.jpg"):
        read_rgb(path)
