"""A real RTSP server (GStreamer's GstRtspServer) for the capture tests, run as its own process so a test can
kill it mid-stream like a camera losing power.

    python rtsp_server.py --port 8554 --mount /h264=vtest_h264.mp4 --mount /h265=vtest_h265.mp4 [--auth user:pass]

Each mount serves an MP4 (H.264 or H.265, already encoded) at its own frame rate, looping, as an IP camera does.
Prints `ready` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def launch_line(path: str) -> str:
    parse, pay = ("h265parse", "rtph265pay") if "265" in path else ("h264parse", "rtph264pay")
    return (
        f'( filesrc location="{path}" ! qtdemux ! {parse} config-interval=-1 ! '
        f"{pay} name=pay0 pt=96 config-interval=-1 )"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mount", action="append", required=True, help="/path=file.mp4")
    parser.add_argument("--auth", help="user:password required of every client (Basic)")
    args = parser.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for mount in args.mount:
        path, file = mount.split("=", 1)
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_line(file))
        factory.set_shared(True)
        factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP)
        if args.auth:
            factory.add_role_from_structure(
                Gst.Structure.new_from_string(
                    "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
                )
            )
        mounts.add_factory(path, factory)
    if args.auth:
        user, password = args.auth.split(":", 1)
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {args.port}")
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
