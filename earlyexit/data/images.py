"""Reading images of any mode, bit depth and format as 8-bit RGB, faithfully or with a DataError.

Pillow's own `convert("RGB")` clips wide modes instead of scaling them: a 16-bit PNG ("I;16",
values up to 65535) comes out white, a float image in 0..1 comes out black. Here every mode is
mapped onto 0..255 by its meaning, transparency is composited onto white (as a viewer shows
it), EXIF orientation is applied, and a file that is missing, not an image, truncated or a
decompression bomb becomes one DataError line that says what to do.
"""

from __future__ import annotations

import numpy as np

from earlyexit.errors import DataError, first_line

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _wide_to_uint8(values: np.ndarray, integer: bool) -> np.ndarray:
    """Grey values of a wide mode (16/32-bit integer or float) onto 0..255.

    Integer images are 8-bit data in a wide container when they fit 0..255, else 16-bit data
    (the usual source: 16-bit PNG or TIFF) when they fit 0..65535; floats are 0..1 data when
    they fit 0..1. Anything else is stretched from its own minimum to its maximum."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if not integer and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0  # 65535 -> 255 exactly
    elif high > low:
        scaled = (values - low) / (high - low) * 255.0
    else:  # one value outside every known range: below zero reads as black, above as white
        scaled = np.full_like(values, 0.0 if low < 0 else 255.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_rgb(image):
    """`image` (a PIL image of any mode) as an 8-bit RGB image."""
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the picture unreadable
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _wide_to_uint8(np.asarray(image), integer=mode != "F")
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha: over white, a pixel is its colour + (255 - alpha)
        values = np.asarray(image).astype(np.int32)
        color, alpha = values[..., :-1], values[..., -1:]
        over_white = np.clip(color + 255 - alpha, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(over_white, 3 // over_white.shape[-1], axis=-1), mode="RGB")
    if "A" in image.getbands() or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str, fix: str = "check the data set's image files"):
    """The image file at `path` as 8-bit RGB (the first frame of an animation), or a DataError
    that names the file, what is wrong and `fix`."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; such an image is refused too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"image file {path} is missing; {fix}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an image file; {fix}") from None
    except PermissionError:
        raise DataError(f"image file {path} cannot be read (permission denied); make it readable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path} is too large to decode safely ({first_line(error)}); {fix}") from None
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image Pillow can read; {fix}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # truncated or malformed data
        raise DataError(f"{path} is not a readable image ({first_line(error)}); {fix}") from None


