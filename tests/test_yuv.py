"""vigild's I420 → BGR conversion agrees with GStreamer's own videoconvert, for packed, padded and odd sizes."""

from __future__ import annotations

import numpy as np
import pytest

from vigild.capture.yuv import I420Layout, i420_to_bgr
from vigild.gstreamer import gst_modules


def pull(gst, description: str):
    pipeline = gst.parse_launch(description)
    pipeline.set_state(gst.State.PLAYING)
    try:
        sample = pipeline.get_by_name("sink").try_pull_sample(5 * gst.SECOND)
        assert sample is not None
        buffer = sample.get_buffer()
        return sample.get_caps(), np.frombuffer(buffer.extract_dup(0, buffer.get_size()), np.uint8)
    finally:
        pipeline.set_state(gst.State.NULL)


@pytest.mark.parametrize(("width", "height", "packed"), [(768, 576, True), (770, 576, False), (769, 575, False)])
def test_matches_videoconvert(width, height, packed):
    gst, _, gst_video = gst_modules()
    source = f"videotestsrc pattern=smpte num-buffers=1 ! video/x-raw,format=I420,width={width},height={height}"
    caps, data = pull(gst, f"{source} ! appsink name=sink")
    info = gst_video.VideoInfo.new_from_caps(caps)
    layout = I420Layout(width, height, tuple(info.stride[:3]), tuple(info.offset[:3]))
    assert layout.packed is packed
    ours = i420_to_bgr(data, layout)

    bgr_caps, bgr = pull(gst, f"{source} ! videoconvert ! video/x-raw,format=BGR ! appsink name=sink")
    stride = gst_video.VideoInfo.new_from_caps(bgr_caps).stride[0]
    theirs = bgr[: height * stride].reshape(height, stride)[:, : width * 3].reshape(height, width, 3)
    assert ours.shape == (height, width, 3) and ours.flags.c_contiguous
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    # the two differ by rounding and by how chroma is upsampled at colour edges; a wrong plane or swapped U/V
    # is off by tens everywhere
    assert difference.mean() < 3 and np.percentile(difference, 95) <= 4, (difference.mean(), difference.max())
    # and the comparison can tell: the same planes with U and V swapped are far off
    u_v_swapped = I420Layout(width, height, layout.strides, (layout.offsets[0], layout.offsets[2], layout.offsets[1]))
    assert np.abs(i420_to_bgr(data, u_v_swapped).astype(np.int16) - theirs.astype(np.int16)).mean() > 20
