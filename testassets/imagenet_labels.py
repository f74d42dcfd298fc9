"""The ``imagenet_labels`` asset: the 1000 ImageNet class names in class
order, ``testassets/data/imagenet_labels.txt``, committed to the repository.

Built (only when the committed file is missing or invalid) from the
``timm==1.0.31`` wheel's synset tables; the demo's bundle and the tests read
it as the MobileNetV2's labels.
"""

from __future__ import annotations

from pathlib import Path

from testassets.common import (DATA_DIR, AssetError, atomic_write_text, log, pip_download,
                               read_wheel_member)

LABELS_PATH = DATA_DIR / "imagenet_labels.txt"
TIMM_WHEEL = "timm==1.0.31"
TIMM_SYNSETS_MEMBER = "timm/data/_info/imagenet_synsets.txt"
TIMM_LEMMA_MEMBER = "timm/data/_info/imagenet_synset_to_lemma.txt"
#: Spot checks for the label file (index -> name).
LABEL_SPOT_CHECKS = {0: "tench", 281: "tabby", 282: "tiger cat",
                     285: "Egyptian cat", 967: "espresso"}


def _labels_valid(path: Path) -> bool:
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    return (len(lines) == 1000 and all(line.strip() for line in lines)
            and all(lines[i] == name for i, name in LABEL_SPOT_CHECKS.items()))


def build_imagenet_labels(cache_dir: Path, force: bool = False) -> Path:
    """``testassets/data/imagenet_labels.txt``: 1000 ImageNet names in class order.

    The file is committed to the repository; it is only regenerated when it
    is missing or invalid (or with ``force``).  Source: the ``timm`` wheel's
    ``imagenet_synsets.txt`` (class order) and ``imagenet_synset_to_lemma.txt``
    (names); each line is the first comma-separated lemma of its synset.
    Note that ImageNet has two "crane" (134 bird, 517 machine) and two
    "maillot" (638, 639) classes.
    """
    out = LABELS_PATH
    if not force and _labels_valid(out):
        return out
    wheel = pip_download(TIMM_WHEEL, cache_dir / "downloads")
    synsets = read_wheel_member(wheel, TIMM_SYNSETS_MEMBER).decode("utf-8").split()
    lemmas: dict[str, str] = {}
    for line in read_wheel_member(wheel, TIMM_LEMMA_MEMBER).decode("utf-8").splitlines():
        synset, _, names = line.partition("\t")
        lemmas[synset.strip()] = names
    if len(synsets) != 1000:
        raise AssetError(f"{TIMM_SYNSETS_MEMBER} lists {len(synsets)} synsets, expected 1000")
    missing = [s for s in synsets if s not in lemmas]
    if missing:
        raise AssetError(f"no lemma for synsets {missing[:5]} ...")
    labels = [lemmas[s].split(",")[0].strip() for s in synsets]
    for index, name in LABEL_SPOT_CHECKS.items():
        if labels[index] != name:
            raise AssetError(f"label {index} is {labels[index]!r}, expected {name!r}")
    atomic_write_text(out, "\n".join(labels) + "\n")
    log(f"wrote {out}")
    return out


def load_labels() -> list[str]:
    """The 1000 ImageNet labels from the committed label file."""
    return LABELS_PATH.read_text(encoding="utf-8").splitlines()
