"""Model files written to attack the daemon (issue 29): darknet cfgs that ask for any amount of memory, ONNX metadata
that is out of range, external data outside the model's directory. Each is refused with a config error naming the
file and the line (cfg) or key (metadata), before anything large is allocated."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, VTEST, daemon_env
from onnx import TensorProto, helper, numpy_helper

from vigild.config.settings import CameraConfig
from vigild.plugin import PluginConfigError, PluginContext
from vigild.plugins.detection.darknet import DarknetBackend, DarknetSpec
from vigild.plugins.detection.darknet_torch import load_darknet
from vigild.plugins.detection.detector import Detector, DetectorConfig

HEADER = np.array([0, 2, 0, 0, 0], np.int32).tobytes()  # major 0, minor 2, revision, 64-bit images seen
HEAD = "[net]\nwidth=416\nheight=416\nchannels=3\n\n"
YOLO = "[yolo]\nmask=0\nanchors=10,14\nclasses=80\n"
# as the finding's 162-byte cfg: under 200 bytes, a 183 GiB kernel
BOMB = HEAD + "[convolutional]\nbatch_normalize=1\nfilters=4000000\nsize=64\nstride=1\npad=1\nactivation=leaky\n\n" + YOLO
# every option in bounds, 151 M weights (604 MB) that a 20-byte weights file does not hold
BIG = ("[net]\nwidth=32\nheight=32\n[convolutional]\nfilters=4096\nsize=1\n[convolutional]\nfilters=4096\nsize=3\npad=1\n"
       "[convolutional]\nfilters=85\nsize=1\n" + YOLO)  # fmt: skip

# under this address-space limit, in a process of its own: a refusal must come before any large allocation
UNDER_LIMIT = """
import json, resource, sys
from pathlib import Path
from vigild.plugins.detection.darknet import DarknetBackend, DarknetSpec
from vigild.plugins.detection.darknet_torch import load_darknet
vm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmSize:')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (384 << 20), vm + (384 << 20)))
found = []
for runtime, cfg, weights in json.loads(sys.argv[1]):
    try:
        if runtime == 'torch':
            load_darknet(Path(cfg), Path(weights))
        else:
            DarknetBackend(DarknetSpec(Path(cfg), Path(weights), None, None, 0.25, 0.45, 'cpu'))
        found.append(['accepted', None, ''])
    except Exception as exc:
        found.append([type(exc).__name__, getattr(exc, 'key', None), str(exc)])
print(json.dumps(found))
"""


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_a_cfg_that_asks_for_hundreds_of_gigabytes_is_refused_by_line_and_key_before_it_allocates(tmp_path):
    bomb, big = write(tmp_path / "bomb.cfg", BOMB), write(tmp_path / "big.cfg", BIG)
    assert len(BOMB) < 200
    weights = write(tmp_path / "tiny.weights", HEADER + b"\0" * 16)
    cases = [[runtime, str(cfg), str(weights)] for runtime in ("torch", "opencv") for cfg in (bomb, big)]
    done = subprocess.run([sys.executable, "-c", UNDER_LIMIT, json.dumps(cases)], env=daemon_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    for runtime in (0, 2):  # torch, then opencv: the same refusals
        assert found[runtime][:2] == ["DarknetCfgError", "cfg"], found[runtime]
        assert found[runtime][2] == f"{bomb}: line 8: `filters=4000000` in [convolutional]: expected 1 to 16384"
        # in bounds, but the weights file's size is compared with the cfg's count before a tensor is made
        assert found[runtime + 1] == ["DarknetCfgError", "weights", f"{weights}: holds 4 weights, the cfg needs "
                                      f"{3 * 4096 + 4096 + 4096 * 4096 * 9 + 4096 + 4096 * 85 + 85}"]  # fmt: skip


CFG_REFUSALS = [  # cfg text (after the [net] section of HEAD unless it has its own), what the refusal says
    ("[convolutional]\nfilters=16\nsize=64\n", r"line 8: `size=64` in \[convolutional\]: expected 1 to 32"),
    ("[convolutional]\nfilters=99999999999999999999999\n", r"line 7: `filters=9+` in \[convolutional\]: expected 1"),
    ("[convolutional]\nfilters=16\nstride=0\n", r"line 8: `stride=0` in \[convolutional\]: expected 1 to 32"),
    ("[convolutional]\nfilters=-4\n", r"line 7: `filters=-4` in \[convolutional\]: expected 1 to 16384"),
    ("[convolutional]\nfilters=4\ngroups=3\n", r"line 8: `groups=3` in \[convolutional\]: divides neither 3 input"),
    ("[upsample]\nstride=1000\n", r"line 7: `stride=1000` in \[upsample\]: expected 1 to 32"),
    ("[net]\nwidth=100000\n", r"line 2: `width=100000` in \[net\]: expected 32 to 8192"),
    ("[net]\nwidth=100\n", r"line 2: `width=100` in \[net\]: expected a multiple of 32"),
    ("[net]\nchannels=100000\n", r"line 2: `channels=100000` in \[net\]: the detector feeds 3-channel frames"),
    ("[route]\nlayers=5\n", r"line 7: `layers=5` in \[route\]: refers to a layer that is not before it"),
    ("[yolo]\nclasses=1000000000\n", r"line 7: `classes=1000000000` in \[yolo\]: expected 1 to 10000"),
    ("[yolo]\nanchors=1e999,2\n", r"line 7: `anchors=1e999,2` in \[yolo\]: expected numbers"),
    # every option in bounds, and a 8192x8192x4096 output (1 TiB a frame) at the first frame
    ("[net]\nwidth=8192\nheight=8192\n[convolutional]\nfilters=4096\nsize=1\n",
     r"\[convolutional\] at line 4: its output would hold 4096x8192x8192 values a frame; at most 268435456"),
    ("[net]\nwidth=32\nheight=32\n[convolutional]\nfilters=16384\nsize=32\n[convolutional]\nfilters=16384\nsize=32\n"
     "pad=1\n", r"\[convolutional\] at line 7: the cfg needs \d+ weights by this layer; at most 268435456"),
    ("[net]\n" + "[dropout]\n" * 5000, r"line 4097: more than 4096 sections"),
    ("[net]\n[convolutional]\nfilters=84\n" + YOLO, r"\[yolo\] at line 4: 84 input channels for 1 anchors of 80"),
]


@pytest.mark.parametrize("runtime", ["torch", "opencv"])
def test_cfg_options_out_of_bounds_are_refused_naming_the_file_line_and_key(tmp_path, runtime):
    weights = write(tmp_path / "w.weights", HEADER + b"\0" * 64)
    for text, refusal in CFG_REFUSALS:
        cfg = write(tmp_path / "hostile.cfg", text if text.startswith("[net]") else HEAD + text)
        with pytest.raises(PluginConfigError) as caught:
            if runtime == "torch":
                load_darknet(cfg, weights)
            else:
                DarknetBackend(DarknetSpec(cfg, weights, None, None, 0.25, 0.45, "cpu"))
        assert caught.value.key == "cfg"
        assert str(caught.value).startswith(f"{cfg}: "), str(caught.value)
        assert caught.value.args and re.search(refusal, str(caught.value)), (refusal, str(caught.value))
    huge = write(tmp_path / "huge.cfg", HEAD + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(PluginConfigError, match=rf"{huge} is larger than 1048576 bytes: not a darknet cfg"):
        load_darknet(huge, weights) if runtime == "torch" else DarknetBackend(
            DarknetSpec(huge, weights, None, None, 0.25, 0.45, "cpu"))  # fmt: skip


def test_an_input_size_that_makes_a_layer_too_large_is_refused_for_that_size(tmp_path):
    """The cfg is walked at the size the detector runs it at: a control client's `input_size` is bounded too."""
    cfg = write(tmp_path / "wide.cfg", "[net]\nwidth=64\nheight=64\n[convolutional]\nfilters=4096\nsize=1\n"
                                       "[convolutional]\nfilters=85\nsize=1\n" + YOLO)  # fmt: skip
    weights = write(tmp_path / "wide.weights", HEADER + np.zeros(3 * 4096 + 4096 + 4096 * 85 + 85, np.float32).tobytes())
    assert load_darknet(cfg, weights).weight_count == 3 * 4096 + 4096 + 4096 * 85 + 85  # at its own size, it loads
    with pytest.raises(PluginConfigError, match=r"wide.cfg: \[convolutional\] at line 4: its output would hold "
                                                r"4096x8192x8192 values"):  # fmt: skip
        load_darknet(cfg, weights, input_size=(8192, 8192))


# ONNX


def tiny_onnx(path: Path, metadata: dict[str, str], *, fixed: tuple[int, ...] | None = None, external: bool = False,
              classes: int = 80) -> Path:  # fmt: skip
    """A model in ultralytics' layout: a 1x1 convolution to 4 + classes channels, reshaped to (batch, rows, anchors)."""
    kernel = numpy_helper.from_array(np.full((4 + classes, 3, 1, 1), 0.01, np.float32), "kernel")
    shape = numpy_helper.from_array(np.array([0, 4 + classes, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "kernel"], ["conv"]), helper.make_node("Reshape", ["conv", "shape"], ["output0"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(fixed or ("batch", 3, "height", "width")))],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + classes, "anchors"])],
        [kernel, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"names": repr({i: f"c{i}" for i in range(classes)}), **metadata})
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.stem}.bin", size_threshold=100)
    return path


def start(weights: Path) -> Detector:
    plugin = Detector(DetectorConfig(weights=str(weights)), PluginContext("cpu", {"vtest": CameraConfig(source=str(VTEST))}))
    plugin.start()
    return plugin


@pytest.mark.parametrize("imgsz", ["[1e999, 640]", "[0, 0]", "[100000, 100000]", "[-64, 640]", "[640.0, 640]",
                                   "[True, 640]", "[320, 100]", "640", "[" * 200])  # fmt: skip
def test_imgsz_metadata_out_of_range_is_refused_naming_the_file_and_key(tmp_path, imgsz):
    model = tiny_onnx(tmp_path / "bad.onnx", {"imgsz": imgsz})
    with pytest.raises(PluginConfigError, match=r"bad.onnx: metadata `imgsz` ") as caught:
        start(model)
    assert caught.value.key == "weights" and str(caught.value).startswith(str(model))


def test_other_metadata_and_shapes_out_of_range_are_refused_naming_the_file(tmp_path):
    for name, settings, refusal in [
        ("pose", {"metadata": {"imgsz": "[320, 320]", "task": "pose", "kpt_shape": "[1000000000, 3]"}},
         r"metadata `kpt_shape` is '\[1000000000, 3\]'"),
        ("batch", {"metadata": {}, "fixed": (100000, 3, 320, 320)}, r"its batch is fixed at 100000; from 1 to 256 run"),
        ("side", {"metadata": {}, "fixed": (1, 3, 100000, 320)}, r"its input is fixed at \[320, 100000\]; sides from 32"),
        ("names", {"metadata": {"imgsz": "[320, 320]", "names": "x" * (2 << 20)}}, r"metadata `names` is 2097152 characters"),
    ]:
        model = tiny_onnx(tmp_path / f"{name}.onnx", **settings)  # type: ignore[arg-type]
        with pytest.raises(PluginConfigError, match=rf"{model}: {refusal}"):
            start(model)


def test_external_data_is_read_beside_the_model_whatever_the_working_directory(tmp_path, monkeypatch):
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir(), elsewhere.mkdir()
    model = tiny_onnx(models / "ext.onnx", {"imgsz": "[320, 256]"}, external=True)
    assert (models / "ext.bin").is_file()
    monkeypatch.chdir(elsewhere)
    plugin = start(model)
    assert plugin.backend.input_size == (256, 320) and plugin.backend.class_names[79] == "c79"


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE", "link.bin"])
def test_external_data_outside_the_models_directory_is_refused(tmp_path, location):
    models = tmp_path / "models"
    models.mkdir()
    model = tiny_onnx(models / "ext.onnx", {"imgsz": "[320, 320]"}, external=True)
    outside = tmp_path / "outside.bin"
    (models / "ext.bin").rename(outside)  # the right bytes, in the wrong place
    (models / "link.bin").symlink_to(outside)
    proto = onnx.load(str(model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = str(outside) if location == "ABSOLUTE" else location
    onnx.save(proto, str(model))
    with pytest.raises(PluginConfigError, match=rf"{model}: not a valid ONNX model: .*kernel") as caught:
        start(model)
    assert caught.value.key == "weights"
