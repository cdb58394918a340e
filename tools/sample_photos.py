"""Write scikit-image's colour sample photographs into a folder: a small test set that every install has
(scikit-image is a requirement) and that no shipped model was trained on.

  python tools/sample_photos.py data/skimage
  python benchmark.py --data data/skimage --out results/skimage

The photos (scikit-image's data module, BSD-licensed or public domain): astronaut, chelsea, coffee,
hubble_deep_field, ihc, motorcycle_left, retina and rocket — people, a cat, a cup, a space telescope
field, a microscope slide, a motorcycle, a retina scan and a rocket launch, from 451 × 300 to 1411 × 1411
pixels. Three of them (hubble_deep_field, retina, rocket) were JPEGs, so they carry JPEG's artefacts.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runtime import HelpFormatter  # noqa: E402

# file name → how skimage.data gives it
PHOTOS = {"astronaut": "astronaut", "chelsea": "chelsea", "coffee": "coffee", "hubble_deep_field": "hubble_deep_field",
          "ihc": "immunohistochemistry", "motorcycle_left": "stereo_motorcycle", "retina": "retina", "rocket": "rocket"}


def main(argv=None):
    """Write the photos as PNG files named after them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("out", help="folder to write the PNG files to (created)")
    args = p.parse_args(argv)
    import skimage.data
    from PIL import Image

    from imagefiles import atomic_write

    os.makedirs(args.out, exist_ok=True)
    for name, loader in PHOTOS.items():
        photo = getattr(skimage.data, loader)()
        rgb = (photo[0] if isinstance(photo, tuple) else photo)[..., :3]  # stereo_motorcycle: (left, right, disparity)
        path = os.path.join(args.out, f"{name}.png")
        atomic_write(path, lambda f: Image.fromarray(rgb).save(f, "PNG"))
        print(f"{path}: {rgb.shape[1]}×{rgb.shape[0]}")


if __name__ == "__main__":
    main()
