"""Training data for ``fastres train``: scikit-learn's digits (bundled, no download) or an image folder.

Both give ``Data``: a training stream of ``(images, labels)`` batches, the
same for every model trained side by side, and a held-out set to measure
accuracy on.
"""

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass
class Data:
    name: str
    num_classes: int
    train_size: int
    test_size: int
    batches: callable  # batches(batch_size, steps, seed) -> iterator of (images, labels) on the CPU
    test_batches: callable  # test_batches(batch_size) -> iterator of (images, labels)


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator:
    """``steps`` batches drawn without replacement, reshuffled each epoch; the order is the seed's."""
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * batch_size // n + 1)])
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx], y[idx]


def digits(image_size: int, seed: int) -> Data:
    """The 1797 8x8 handwritten digits, upscaled to RGB ``image_size`` squares, split 80/20 by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the built-in data is scikit-learn's digits: pip install scikit-learn "
                         "(or train on an image folder with --data DIR)") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()  # the training split's statistics only
    x = F.interpolate(((x - mean) / std).repeat(1, 3, 1, 1), size=image_size, mode="bilinear", align_corners=False)
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    return Data(
        name=f"digits ({image_size}x{image_size})", num_classes=10, train_size=len(train), test_size=n_test,
        batches=lambda batch_size, steps, seed: _tensor_batches(x_train, y_train, batch_size, steps, seed),
        test_batches=lambda batch_size: ((x_test[i:i + batch_size], y_test[i:i + batch_size])
                                         for i in range(0, n_test, batch_size)),
    )


def _readable(loader, root: Path) -> Iterator:
    """``loader``'s batches; an image that cannot be read ends the run with a message naming it."""
    try:
        yield from loader
    except OSError as err:  # PIL's UnidentifiedImageError, truncated files, unreadable files
        raise SystemExit(f"--data {root}: cannot read an image: {err}") from None


def image_folder(root: Path, image_size: int, seed: int, workers: int) -> Data:
    """torchvision's ImageFolder layout: ``root/CLASS/*.png``, or ``root/train/CLASS`` and ``root/val/CLASS``.

    Without train/ and val/ subfolders a fixed 20% of ``root`` (by ``seed``) is held out.
    Images are resized to ``image_size`` (shorter side), center-cropped and normalised with
    ImageNet's statistics.
    """
    from fastres._torchvision import import_torchvision

    tv = import_torchvision()
    T = tv.transforms
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"--data {root}: not a directory")
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = tv.datasets.ImageFolder(root / "train", transform)
            test = tv.datasets.ImageFolder(root / "val", transform)
            if test.classes != train.classes:
                raise SystemExit(f"--data {root}: train/ and val/ have different classes")
        else:
            full = tv.datasets.ImageFolder(root, transform)
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, len(full) // 5) if len(full) > 1 else 0
            test, train = torch.utils.data.Subset(full, perm[:n_test]), torch.utils.data.Subset(full, perm[n_test:])
            train.classes = full.classes
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
        raise SystemExit(f"--data {root}: {err}") from None
    if len(train) == 0:
        raise SystemExit(f"--data {root}: no training images")

    def batches(batch_size, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen,
                                             num_workers=workers, drop_last=len(train) >= batch_size)
        done = 0
        while done < steps:
            for batch in _readable(loader, root):
                yield batch
                done += 1
                if done == steps:
                    return

    def test_batches(batch_size):
        yield from _readable(torch.utils.data.DataLoader(test, batch_size=batch_size, num_workers=workers), root)

    return Data(name=f"image folder {root} ({image_size}x{image_size})", num_classes=len(train.classes),
                train_size=len(train), test_size=len(test), batches=batches, test_batches=test_batches)
