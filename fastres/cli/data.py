"""Training data for ``fastres train``: scikit-learn's digits (bundled), CIFAR-10/100, or an image folder.

Each gives ``Data``: a training set and a held-out set, both indexed by keys
``(epoch, index)``. The epoch in the key lets an augmenting dataset draw a
sample's random crop and flip from ``(seed, epoch, index)`` alone, so a batch
is the same whichever process or DataLoader worker loads it, and a resumed run
sees exactly the images the interrupted one would have (``fastres.cli.stream``
says which keys each step loads).
"""

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's training set
CIFAR_PAD = 4  # the standard augmentation: random 32x32 crop of the image zero-padded by 4, horizontal flip
DATASETS = ("digits", "cifar10", "cifar100", "folder")


@dataclasses.dataclass
class Data:
    name: str
    num_classes: int
    train: torch.utils.data.Dataset  # train[(epoch, index)] -> (image, label)
    test: torch.utils.data.Dataset  # test[(0, index)] -> (image, label)
    root: Path | None = None  # where the images are read from (error messages)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def test_size(self) -> int:
        return len(self.test)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


def random_crop_flip(image: torch.Tensor, rng: random.Random, pad: int = CIFAR_PAD) -> torch.Tensor:
    """A random crop of ``image`` (C, H, W) zero-padded by ``pad`` on each side, flipped horizontally half the time."""
    _, h, w = image.shape
    dy, dx = rng.randrange(2 * pad + 1), rng.randrange(2 * pad + 1)
    out = F.pad(image, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if rng.random() < 0.5 else out


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: float, or uint8 scaled to [0, 1]; normalised per channel; optionally augmented."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean=None, std=None, augment: bool = False, seed: int = 0):
        self.x, self.y, self.augment, self.seed = x, y, augment, seed
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        epoch, i = key
        image = self.x[i]
        if self.augment:  # on the raw pixels: the padding is black, as torchvision's RandomCrop pads
            image = random_crop_flip(image, random.Random(_sample_seed(self.seed, epoch, i)))
        image = image.float() / 255 if image.dtype == torch.uint8 else image
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, self.y[i]


class Keyed(torch.utils.data.Dataset):
    """A dataset indexed by position, indexed by ``(epoch, index)`` keys (the epoch is not used)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[1]]


def digits(image_size: int, seed: int) -> Data:
    """The 1797 8x8 handwritten digits, upscaled to RGB ``image_size`` squares, split 80/20 by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the built-in data is scikit-learn's digits: pip install scikit-learn "
                         "(or train on --dataset cifar10 or an image folder with --data DIR)") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()  # the training split's statistics only
    x = F.interpolate(((x - mean) / std).repeat(1, 3, 1, 1), size=image_size, mode="bilinear", align_corners=False)
    return Data(name=f"digits ({image_size}x{image_size})", num_classes=10,
                train=TensorImages(x[train], y[train]), test=TensorImages(x[test], y[test]))


CIFAR = {  # torchvision's dataset class, the folder its python batches are in, the files there
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train", "test", "meta"]),
}


def cifar(name: str, root: Path | None, seed: int, augment: bool) -> Data:
    """CIFAR-10 or -100 from its standard python batches (``root/cifar-10-batches-py/data_batch_1`` ...),
    read with torchvision's dataset class; nothing is downloaded."""
    from fastres._torchvision import import_torchvision

    cls_name, folder, files = CIFAR[name]
    if root is None:
        raise SystemExit(f"--dataset {name} reads the python version of {name.upper()} from --data DIR: "
                         f"put {', '.join(files)} in DIR/{folder}/ (from https://www.cs.toronto.edu/~kriz/cifar.html)")
    root = Path(root)
    if root.name == folder:  # the batches' own folder given
        root = root.parent
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing:
        raise SystemExit(f"--data {root}: {name.upper()} needs {', '.join(missing)} in {root / folder}/ "
                         f"(the python version from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked there)")

    base = getattr(import_torchvision().datasets, cls_name)

    class Local(base):
        # torchvision checks each file's md5 against the published archive's; here the files are
        # checked for presence above and for content by torchvision's reading (the arrays' shapes).
        meta = {**base.meta, "md5": None}

        def _check_integrity(self):
            return True

    try:
        train, test = Local(str(root), train=True), Local(str(root), train=False)
    except Exception as err:  # unpickling errors, wrong keys, wrong array sizes
        raise SystemExit(f"--data {root}: cannot read {name.upper()} from {root / folder}: {err!r}") from None

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 N, 3, 32, 32
        return x, torch.tensor(ds.targets, dtype=torch.long)

    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    return Data(name=f"{name.upper()} ({root / folder}, 32x32{', augmented' if augment else ''})",
                num_classes=len(train.classes), root=root,
                train=TensorImages(x_train, y_train, CIFAR_MEAN, CIFAR_STD, augment=augment, seed=seed),
                test=TensorImages(x_test, y_test, CIFAR_MEAN, CIFAR_STD))


def readable(loader, root: Path | None) -> Iterator:
    """``loader``'s batches; an image that cannot be read ends the run with a message naming it."""
    try:
        yield from loader
    except OSError as err:  # PIL's UnidentifiedImageError, truncated files, unreadable files
        raise SystemExit(f"--data {root}: cannot read an image: {err}") from None


def image_folder(root: Path, image_size: int, seed: int) -> Data:
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
    for name, (_, folder, _) in CIFAR.items():
        if (root / folder).is_dir() or root.name == folder:
            raise SystemExit(f"--data {root}: holds {name.upper()}'s python batches; train on them with --dataset {name}")
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = tv.datasets.ImageFolder(root / "train", transform)
            test = tv.datasets.ImageFolder(root / "val", transform)
            if test.classes != train.classes:
                raise SystemExit(f"--data {root}: train/ and val/ have different classes")
            classes = train.classes
        else:
            full = tv.datasets.ImageFolder(root, transform)
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, len(full) // 5) if len(full) > 1 else 0
            test, train = torch.utils.data.Subset(full, perm[:n_test]), torch.utils.data.Subset(full, perm[n_test:])
            classes = full.classes
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
        raise SystemExit(f"--data {root}: {err}") from None
    if len(train) == 0:
        raise SystemExit(f"--data {root}: no training images")
    return Data(name=f"image folder {root} ({image_size}x{image_size})", num_classes=len(classes),
                train=Keyed(train), test=Keyed(test), root=root)


def load(dataset: str, root: Path | None, image_size: int | None, seed: int, augment: bool) -> Data:
    """``--dataset`` (``None``: an image folder with ``--data``, else digits) as ``Data``."""
    dataset = dataset or ("folder" if root else "digits")
    if dataset in CIFAR:
        if image_size not in (None, 32):
            raise SystemExit(f"--image-size {image_size}: {dataset} images are 32x32")
        return cifar(dataset, root, seed, augment)
    if dataset == "folder":
        if root is None:
            raise SystemExit("--dataset folder: give the image folder with --data DIR")
        return image_folder(root, image_size or 224, seed)
    if root is not None:
        raise SystemExit(f"--data {root}: the digits are built in; for an image folder give --dataset folder")
    return digits(image_size or 32, seed)
